"""Localise stage (``--localize``): the patch memory bank built by parallel Ray tasks, and ``PatchScorer``, the
``map_batches`` callable that turns each row's patch grid into its anomaly map and map score.

The fit streams over the materialised normal rows twice and never brings their patches to the driver:
actors pre-select each image's patches (coreset stage 1), the driver orders the survivors by reference
position and coreset tasks take chunks of whole images (stage 2; ``core.patches.greedy_coreset`` is the same
two stages, so the library's ``PatchDN2`` keeps the same rows), shard-building tasks index them, and the
threshold comes from every normal image's leave-one-image-out map, scored by the same actors that score
queries. Maps stream to the sink with the other score columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, JobConfig
from ..core.index import ShardedIndex, build_shard, shard_bounds, shard_groups
from ..core.localize import calibration_sample, map_scores, patch_maps
from ..core.model import FittedModel, with_bank
from ..core.patches import (
    SIGMA,
    border_calibration,
    coreset_chunk,
    coreset_chunks,
    coreset_projection,
    coreset_size,
    peak,
    preselect,
    preselect_size,
    score_map,
)
from ..core.threshold import effective_quantile, threshold_from_scores
from ..runtime import FINAL_POOL_CPUS, SCORE_ACTOR_CPUS, SCORE_ACTOR_GPUS, cluster_resources, resolved, score_pool

PATCH_SCORE = "_patch_score"  # the map score, which KnnScorer writes as ``score``
MAP_COLUMNS = ("anomaly_map", "map_height", "map_width", "image_height", "image_width", "peak_x", "peak_y")
PATCH_NEAREST = "_patch_nn"  # with bank shard groups: each patch's nearest bank distance so far


@dataclass(frozen=True)
class Bank:
    """What a patch-scoring actor reads, as object-store handles."""

    shards: list  # ObjectRefs of core.index.Shard
    owners: object  # ObjectRef of the (n_bank,) reference position of each patch's image
    image_size: int
    sigma: float = SIGMA
    border: np.ndarray | None = None  # (2, rings + 1) border calibration of the score (None: raw maxima)
    rows: tuple[int, ...] = ()  # patches per shard: shard groups are balanced by them
    shard_bytes: tuple[int, ...] = ()  # memory an actor holds per shard (Ray's memory request per group)
    exact: bool = True  # False: a compressed bank scored from its codes (--approximate)

    @classmethod
    def of(cls, model: FittedModel, files_shared: bool = True) -> Bank:
        """The bank of a fitted or loaded model; memory-mapped shards travel with their rows unless every
        actor can open their files (``files_shared``)."""
        shards = model.bank if files_shared else [s.by_value() for s in model.bank]
        return cls.put(shards, model.bank_owners, int(model.meta.image_size), model.meta.border_calibration,
                       not model.meta.approximate)

    @classmethod
    def put(cls, shards: list, owners: np.ndarray, image_size: int, border=None, exact: bool = True) -> Bank:
        import ray

        return cls([ray.put(s) for s in shards], ray.put(owners), image_size,
                   border=None if border is None else np.asarray(border, np.float64),
                   rows=tuple(len(s.vectors) for s in shards), shard_bytes=tuple(s.memory_bytes for s in shards),
                   exact=exact)


class BankSearch:
    """The set-up of every actor that searches the bank: the index over the shards ``group`` (positions into
    ``bank.shards``; None: no index, the rows carry ``PATCH_NEAREST``), the leave-one-image-out exclusion
    (``exclude_ids``: the sorted normal ids of a fit's calibration; rows never match their own image's bank
    patches) and the calibration sample (``calibrate``: positions of the images to score, the others skipped)."""

    def __init__(self, bank: Bank, group: list[int] | None, exclude_ids=None, threads: int | None = None,
                 calibrate=None, device: str = "cpu"):
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        self.index = None if group is None else ShardedIndex([resolved(bank.shards[j]) for j in group],
                                                             exact=bank.exact, device=device)
        self.ids = None if exclude_ids is None else resolved(exclude_ids)
        self.owners, self.max_own = None, 0
        if self.ids is not None and self.index is not None:
            self.owners = resolved(bank.owners)
            lo = int(self.index.offsets[0])
            self.max_own = int(np.bincount(self.owners[lo:lo + self.index.ntotal]).max())
            if self.max_own >= self.index.ntotal:
                raise ValueError(f"a bank shard group holds the patches of one image only ({self.index.ntotal}); "
                                 "leave-one-image-out needs more: use fewer --shard-groups")
        self.calibrate = resolved(calibrate)
        self.size, self.sigma, self.border = bank.image_size, bank.sigma, bank.border

    def rows(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows to map (ok, and in the calibration sample if there is one) and their reference positions."""
        rows = np.flatnonzero(batch["status"] == "ok")
        owners = None if self.ids is None else np.searchsorted(self.ids, batch["id"][rows].astype(str))
        if self.calibrate is not None:
            take = np.isin(owners, self.calibrate)
            rows, owners = rows[take], owners[take]
        return rows, owners

    def nearest(self, grids: np.ndarray, owners: np.ndarray | None) -> np.ndarray:
        """(n, h, w) each patch's distance to its nearest patch of this actor's shards."""
        return patch_maps(self.index, grids, owners, self.owners, self.max_own)


class PatchGroupSearch(BankSearch):
    """One bank shard group's actor (``--shard-groups``): lowers each mapped row's per-patch nearest distance
    so far (``PATCH_NEAREST``, (n, h * w)) to its group's. No actor holds the whole bank; the result is the
    one-group search's, since the minimum over groups is the minimum over the bank."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        grids = batch["patches"]
        n, h, w = grids.shape[:3]
        near = batch.get(PATCH_NEAREST)
        near = np.full((n, h * w), np.inf, dtype=np.float32) if near is None else near.copy()
        rows, owners = self.rows(batch)
        if len(rows):
            near[rows] = np.minimum(near[rows], self.nearest(grids[rows], owners).reshape(len(rows), -1))
        batch[PATCH_NEAREST] = near
        return batch


class PatchScorer(BankSearch):
    """Patch-scoring actor: each ok row's ``patches`` grid → ``anomaly_map`` (row-major h x w: the distances),
    its size, the image's size (``core.patches.map_to_image`` needs both), and from the border-calibrated
    smoothed map (``core.patches.score_map``) its peak in the original image's pixels and the map score
    (``PATCH_SCORE``); ``patches`` (and ``PATCH_NEAREST``, the shard groups' result, when it holds no index)
    are dropped."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        grids = batch.pop("patches")
        near = batch.pop(PATCH_NEAREST, None)
        n, h, w = grids.shape[:3]
        rows, owners = self.rows(batch)
        maps = np.full((n, h * w), np.nan, dtype=np.float32)
        score, px, py = np.full(n, np.nan), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        ih = np.where(batch["height"] > 0, batch["height"], self.size).astype(np.int64)  # 0: size unknown
        iw = np.where(batch["width"] > 0, batch["width"], self.size).astype(np.int64)
        if len(rows):
            m = self.nearest(grids[rows], owners) if self.index is not None else near[rows].reshape(-1, h, w)
            maps[rows] = m.reshape(len(rows), -1)
            for r, grid in zip(rows, m):
                s = score_map(grid, self.size, self.border, self.sigma)
                score[r] = float(s.max())
                px[r], py[r] = peak(s, int(ih[r]), int(iw[r]))
        batch.update({PATCH_SCORE: score, "anomaly_map": maps, "map_height": np.full(n, h), "map_width": np.full(n, w),
                      "image_height": ih, "image_width": iw, "peak_x": px, "peak_y": py})
        return batch


def map_patches(ds, bank: Bank, cfg, exclude_ids=None, calibrate=None, gpu_share: float = SCORE_ACTOR_GPUS):
    """``ds`` (embedded rows with ``patches``) with its maps and map scores (lazy), on a pool of patch scorers
    (searching on ``gpu_share`` of a GPU each where Ray has GPUs, as the global scorers do); with ``cfg.shard_groups``
    G > 1, on G pools that each hold a group of the bank's shards, then a pool that only turns their minimum
    into maps and scores."""
    from ray.data import ActorPoolStrategy

    cpus, gpus = cluster_resources()
    actors, threads = score_pool(cpus, cfg.actors)
    res = {"num_cpus": SCORE_ACTOR_CPUS}
    if gpus:
        actors, res = min(actors, gpus), {**res, "num_gpus": gpu_share}
    batch = max(1, min(cfg.batch_size, 64))
    kw = {"bank": bank, "exclude_ids": exclude_ids, "threads": threads, "calibrate": calibrate,
          "device": "cuda" if gpus else "cpu"}
    groups = shard_groups(list(bank.rows) or [1] * len(bank.shards), cfg.shard_groups)
    if exclude_ids is not None and len(groups) > 1 and bank.rows:
        check_groups_leave_patches(resolved(bank.owners), list(bank.rows), groups)
    if len(groups) == 1:
        return ds.map_batches(PatchScorer, batch_size=batch, batch_format="numpy",
                              compute=ActorPoolStrategy(size=actors), **res,
                              fn_constructor_kwargs={**kw, "group": groups[0]})
    per_pool = max(1, actors // len(groups))
    if gpus:
        res = {**res, "num_gpus": gpu_share / len(groups)}
    for group in groups:
        memory = sum(bank.shard_bytes[j] for j in group) // per_pool if bank.shard_bytes else 0
        ds = ds.map_batches(PatchGroupSearch, batch_size=batch, batch_format="numpy",
                            compute=ActorPoolStrategy(size=per_pool), **res,
                            **({"memory": memory} if memory else {}), fn_constructor_kwargs={**kw, "group": group})
    return ds.map_batches(PatchScorer, batch_size=batch, batch_format="numpy", compute=ActorPoolStrategy(size=per_pool),
                          num_cpus=FINAL_POOL_CPUS, fn_constructor_kwargs={**kw, "group": None})


def check_groups_leave_patches(owners: np.ndarray, rows: list[int], groups: list[list[int]]) -> None:
    """Refuse shard groups (contiguous shards of ``rows`` bank rows each) of which one holds the patches of a
    single normal image: leave-one-image-out would leave that group nothing to search."""
    ends = np.cumsum([0, *rows])
    for g in groups:
        own = owners[ends[g[0]]:ends[g[-1] + 1]]
        if len(own) and np.bincount(own).max() >= len(own):
            raise ConfigError(f"--shard-groups {len(groups)}: a group of bank shards holds the patches of one normal "
                              "image only, which leave-one-image-out cannot search; use fewer groups")


class Preselect:
    """Coreset stage 1 (``core.patches.preselect``) where the normal patches are: each ok row's own k-centre
    survivors, with the row's reference position (``_pos``: its id's place in the sorted normal ids)."""

    def __init__(self, ids, fraction: float):
        self.ids, self.fraction = resolved(ids), fraction

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.flatnonzero(batch["status"] == "ok")
        grids = batch["patches"][rows]
        h, w, d = grids.shape[1:]
        P = coreset_projection(d)  # seeded: the driver's stage 2 uses the same
        kept = [g.reshape(-1, d)[preselect(g.reshape(-1, d), self.fraction, P)] for g in grids]
        return {"_pos": np.searchsorted(self.ids, batch["id"][rows].astype(str)).astype(np.int64),
                "survivors": np.stack(kept) if kept else np.empty((0, preselect_size(h * w, self.fraction), d),
                                                                  np.float32),
                "_grid": np.tile([h, w, d], (len(rows), 1))}


def fit_bank(model: FittedModel, ds, ids: np.ndarray, cfg: JobConfig) -> FittedModel:
    """``model`` (fitted on the global embeddings of the normal rows ``ids``, sorted) with its patch bank and
    with the threshold and calibration of leave-one-image-out map scores. ``ds``: the embedded normal rows
    with ``patches``, materialised (it is read twice, by the coreset's first stage and by the calibration):
    the normal patches stay in the object store (sorted by reference position, selected and indexed by
    tasks): the driver holds the bank's shards and owners only."""
    import ray
    from ray.data import ActorPoolStrategy

    ids = np.asarray(ids).astype(str)
    ids_ref = ray.put(ids)
    n = len(ids)
    fraction = min(1.0, cfg.index.coreset if cfg.index.coreset is not None else 1.0)
    cpus, _ = cluster_resources()
    survivors = ds.select_columns(["id", "status", "patches"]).map_batches(
        Preselect, batch_size=16, batch_format="numpy", num_cpus=1, compute=ActorPoolStrategy(size=max(1, cpus)),
        fn_constructor_kwargs={"ids": ids_ref, "fraction": fraction})
    blocks = survivors.sort("_pos").to_arrow_refs()  # in reference order, in the object store
    heads = ray.get([ray.remote(block_head).remote(b) for b in blocks])
    sizes = [len(p) for p, _ in heads]
    grid = next((g for p, g in heads if len(p)), None)
    if sum(sizes) != n or grid is None:
        raise ValueError(f"{sum(sizes)} of {n} normal rows have patches: every normal image needs them")
    k, grid = grid[0], grid[1:]  # patches each image keeps after stage 1; (h, w, d)
    P = coreset_projection(grid[2])
    share = coreset_size(n * grid[0] * grid[1], fraction) / (n * k) if fraction < 1 else None
    select = ray.remote(num_returns=2)(select_chunk)
    spans = [block_spans(sizes, a, b) for a, b in coreset_chunks(n, k)]
    chunks = [select.remote(sp, share, P, *[blocks[i] for i in sp]) for sp in spans]
    del blocks  # each chunk task holds the blocks it reads; the survivors are freed as the tasks end
    owned = ray.get([o for _, o in chunks])  # the driver holds the bank's owners, its rows stay in the store
    lengths, owners = [len(o) for o in owned], np.concatenate(owned)
    if np.bincount(owners, minlength=n).max() == len(owners):
        raise ConfigError("every patch of the bank belongs to one normal image, so leave-one-image-out has nothing to "
                          "search: --localize needs more normal images or a larger --coreset")
    rows = [r for r, _ in chunks]
    build = ray.remote(gather_shard)
    bounds = shard_bounds(len(owners), cfg.index.shards)
    spans = [block_spans(lengths, a, b) for a, b in bounds]
    shards = ray.get([build.remote(sp, a, cfg.index.kind, *[rows[i] for i in sp]) for sp, (a, _) in zip(spans, bounds)])
    del chunks, rows
    bank = Bank.put(shards, owners, int(cfg.embed.spec().image_size), exact=not cfg.index.approximate)
    calib = calibration_sample(n)
    scored = map_patches(ds, bank, cfg.score, exclude_ids=ids_ref, calibrate=ray.put(calib))
    maps = np.full((len(calib), grid[0] * grid[1]), np.nan, dtype=np.float32)  # the calibration sample's maps
    for b in scored.select_columns(["id", "status", "anomaly_map"]).iter_batches(batch_size=None,
                                                                                 batch_format="numpy"):
        pos = np.searchsorted(ids, b["id"].astype(str))
        take = np.flatnonzero((b["status"] == "ok") & np.isin(pos, calib))
        if len(take):
            maps[np.searchsorted(calib, pos[take])] = np.stack(b["anomaly_map"][take])
    maps = maps.reshape(len(calib), grid[0], grid[1])
    border = border_calibration(maps)
    loo = map_scores(maps, bank.image_size, bank.sigma, border)
    q = effective_quantile(cfg.score.quantile, cfg.score.contamination)
    return with_bank(model, shards, owners, loo, threshold_from_scores(loo, q), grid, cfg.index.coreset, border)


def block_spans(sizes: list[int], a: int, b: int) -> dict[int, tuple[int, int]]:
    """{block: (start, stop)} of the rows [a, b) of consecutive blocks of ``sizes`` rows."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return {i: (max(a, int(starts[i])) - int(starts[i]), min(b, int(starts[i + 1])) - int(starts[i]))
            for i in range(len(sizes)) if starts[i] < b and starts[i + 1] > a and sizes[i]}


def block_head(block) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """A survivors block's reference positions and (h, w, d) grid with the patches kept per image first."""
    from ray.data.block import BlockAccessor

    pos = BlockAccessor.for_block(block).to_numpy("_pos")
    if not len(pos):
        return pos, None
    head = BlockAccessor.for_block(block.slice(0, 1)).to_numpy(["survivors", "_grid"])
    return pos, (int(head["survivors"].shape[1]), *(int(v) for v in head["_grid"][0]))


def _rows(spans: dict[int, tuple[int, int]], parts, column: str | None = None) -> np.ndarray:
    """The spans' rows of ``parts`` (Arrow blocks with ``column``, or arrays), concatenated."""
    from ray.data.block import BlockAccessor

    return np.concatenate([part[a:b] if column is None else BlockAccessor.for_block(part.slice(a, b - a)).to_numpy(column)
                           for (a, b), part in zip(spans.values(), parts)])


def select_chunk(spans: dict[int, tuple[int, int]], share: float | None, projection, *blocks):
    """Coreset stage 2 on one chunk of whole images (the spans of ``blocks``): the kept patches (n_kept, d)
    and their images' reference positions; ``share`` None keeps every survivor."""
    S = _rows(spans, blocks, "survivors")
    pos = _rows(spans, blocks, "_pos")
    k = S.shape[1]
    S = S.reshape(-1, S.shape[2])
    keep = np.arange(len(S)) if share is None else coreset_chunk(S, share, projection)
    return np.ascontiguousarray(S[keep]), pos[keep // k].astype(np.int64)


def gather_shard(spans: dict[int, tuple[int, int]], offset: int, kind: str, *parts):
    """One bank shard of index ``kind`` from the spans of the chunks' kept patches."""
    return build_shard(_rows(spans, parts), offset, kind)
