"""Fit stage: the core fit routine (``core.dn2.fit_reference``) with its index built by parallel Ray tasks
and its calibration queries run by the scoring actors (``RayBackend``)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa

from ..config import ConfigError, JobConfig, ScoreConfig
from ..core.arrays import take_rows
from ..core.dn2 import (
    Fit,
    FitParams,
    LocalBackend,
    NoNeighbours,
    fit_reference,
    largest_copy_group,
    rank_within_groups,
)
from ..core.index import build_shard, shard_bounds
from ..core.labels import label_names, label_rows
from ..core.model import FittedModel, model_from_fit
from ..core.settings import FIT_SETTINGS, IMAGE_SETTINGS
from ..runtime import cluster_resources
from .collect import Embedded, as_dataset
from .score import Scorer


class RayBackend:
    """Shards built as parallel Ray tasks and kept in the object store; searches on the scoring actors."""

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self.exact = True

    def build(self, X: np.ndarray, n_shards: int, kind: str, exact: bool = True) -> list:
        import ray

        self.exact = exact
        bounds = shard_bounds(len(X), n_shards)
        self.rows = [b - a for a, b in bounds]
        self.bytes = [r * X.shape[1] * 4 for r in self.rows]
        task = ray.remote(build_shard)
        return [task.remote(np.asarray(X[a:b]), a, kind) for a, b in bounds]

    def search(self, handle: list, Xq: np.ndarray, k: int, positions: np.ndarray | None = None,
               groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import ray

        cpus, _ = cluster_resources()
        scorer = Scorer(handle, None, k, None, self.cfg, exact=self.exact, shard_rows=self.rows, shard_bytes=self.bytes)
        ds = as_dataset(np.arange(len(Xq)).astype(str).astype(object), Xq, cpus)
        exclude = None if positions is None else "duplicates" if groups is not None else "self"
        scored = scorer.map(ds, exclude=exclude, groups_ref=ray.put(groups) if groups is not None else None,
                            positions=True)
        scored = scored.select_columns(["_pos", "score", "neighbor_dists", "_nbr_pos"])  # no neighbour id strings
        t = pa.concat_tables(list(scored.iter_batches(batch_size=None, batch_format="pyarrow"))).sort_by("_pos")
        flat = lambda c: t[c].combine_chunks().flatten().to_numpy().reshape(len(Xq), k)  # noqa: E731
        return t["score"].to_numpy(), flat("neighbor_dists").astype(np.float64), flat("_nbr_pos").astype(np.int64)


LOCAL_SEARCH_ROWS = 20_000  # a search over at most this many rows runs in the driver: starting actors costs more


def search_backend(cfg: JobConfig, rows: int) -> RayBackend | LocalBackend:
    """Where a leave-one-out search over ``rows`` rows runs: sharded on the scoring actors, or (small sets)
    in this process."""
    return LocalBackend() if rows <= LOCAL_SEARCH_ROWS else RayBackend(cfg.score)


def fit_params(cfg: JobConfig) -> FitParams:
    """The job's fit settings (``core.settings.FIT_SETTINGS``) as the core's ``FitParams``."""
    return FitParams(**{s.fit: s.get(cfg) for s in FIT_SETTINGS})


def embedding_meta(cfg: JobConfig) -> dict:
    """How the job embeds images, as the model records it: the image settings, the crop size resolved."""
    spec = cfg.embed.spec()
    return {**{s.meta: s.to_meta(s.get(cfg)) for s in IMAGE_SETTINGS}, "image_size": spec.image_size,
            "resize": spec.resize}  # --localize embeds whole images whatever --resize says


def fit_model(normal: Embedded, cfg: JobConfig, weights, extra_neighbours: int = 0) -> tuple[FittedModel, Fit]:
    """Fit on the collected normal embeddings; the model records how its embeddings were made (``weights``:
    the resolved backbone weights, or None for precomputed vectors). ``extra_neighbours``: leave-one-out
    neighbours fetched beyond k (``Fit.neighbour_pos``)."""
    import ray

    params = replace(fit_params(cfg), extra_neighbours=extra_neighbours)
    n, d = normal.X.shape
    if params.pca and params.pca > min(n, d):
        raise ConfigError(f"--pca {params.pca} needs at most min(normal rows, embedding dimensions) = "
                          f"min({n}, {d}) components")
    fit = fit_reference(normal.X, normal.ids, params, RayBackend(cfg.score))
    labels = normal.extra.get("label")
    images = weights is not None
    model = model_from_fit(
        fit, ray.get(fit.handle), params, embedding_meta(cfg) if images else None,
        weights_identity=weights.identity if images else None,
        normal_source=cfg.to_dict()["normal"],  # credentials removed
        normal_labels=sorted({str(v) for v in labels if v is not None}) if labels is not None else None)
    return model, fit


SHARED_VECTOR_FRACTION = 0.01  # a vector shared by more of the normal rows than this is reported


def shared_vector_warnings(X: np.ndarray, image_size: int | None) -> list[str]:
    """A warning when one embedding vector stands for many of the normal rows ``X``: copies of one image (blank
    frames), or a backbone fed images too small to tell apart (EfficientNet-Lite2 at ``--image-size 32`` embeds
    half of CIFAR-10 as the zero vector). Such images all score alike and group as duplicates of each other.
    ``image_size``: the backbone's input size, None for a source of vectors."""
    n, m = len(X), largest_copy_group(X)
    if m < 10 or m <= SHARED_VECTOR_FRACTION * n:
        return []
    cause = (f"images the backbone cannot tell apart at --image-size {image_size} (a larger --image-size, the "
             "backbone's own, separates them)" if image_size else "identical input vectors")
    return [f"{m} of {n} normal rows ({m / n:.1%}) have one identical embedding vector: copies of one image, or "
            f"{cause}"]


SMALL_LABEL_ROWS = 20_000  # labels up to this many rows are ranked whole inside a task, several to a task
LABEL_TASK_BYTES = 32 * 2**20  # the vectors one such task receives, at most (unless one label holds more)


def fit_per_label(data: Embedded, labels: np.ndarray, cfg: JobConfig,
                  small_rows: int = SMALL_LABEL_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each label's rows ranked against the rest of that label (the unsupervised setting, per class): (scores
    (n,), neighbour ids (n, k), neighbour distances (n, k)). Rows without a label, or alone in theirs, score
    NaN; a label of fewer than k + 1 rows leaves its rows' missing neighbours None / NaN.

    A label of more than ``small_rows`` rows is fitted on the sharded index and scoring actors, as a whole-set
    fit is. Smaller labels are packed into Ray tasks that each rank whole labels in one process
    (``core.dn2.rank_within_groups``): a set of a thousand labels costs tasks, not a thousand actor pipelines
    (2-3 s each). With the flat index the neighbours are the same either way; an approximate kind (``--index
    ivf``...) searches one index per small label instead of the label's shards."""
    params = replace(fit_params(cfg), extra_neighbours=0, reduce=None)
    n, k = len(data.ids), params.k
    scores, dist, pos = np.full(n, np.nan), np.full((n, k), np.nan), np.full((n, k), -1, dtype=np.int64)
    groups = [rows for _, rows in label_rows(label_names(labels)) if len(rows) >= 2]
    for rows in (r for r in groups if len(r) > small_rows):
        try:
            fit = fit_reference(take_rows(data.X, rows), data.ids[rows], replace(params, k=min(k, len(rows) - 1)),
                                RayBackend(cfg.score))
        except NoNeighbours:
            continue  # every row a copy of one: nothing to rank against
        scores[rows], dist[rows, :fit.k], pos[rows, :fit.k] = (fit.calibration_scores, fit.calibration_dist,
                                                               rows[fit.calibration_pos])
    small = [r for r in groups if len(r) <= small_rows]
    for rows, (s, d, p) in rank_small_labels(data.X, small, params):
        scores[rows], dist[rows], pos[rows] = s, d, np.where(p >= 0, rows[np.maximum(p, 0)], -1)
    ids = np.where(pos >= 0, data.ids[np.maximum(pos, 0)], None)
    return scores, ids, dist


def label_batches(groups: list[np.ndarray], width: int, budget: int) -> list[list[np.ndarray]]:
    """Consecutive labels' rows packed into batches of at most ``budget`` bytes of float32 vectors (a larger
    label is a batch of its own)."""
    batches: list[list[np.ndarray]] = []
    size = 0
    for rows in groups:
        nbytes = len(rows) * width * 4
        if not batches or size + nbytes > budget:
            batches.append([])
            size = 0
        batches[-1].append(rows)
        size += nbytes
    return batches


def rank_small_labels(X: np.ndarray, groups: list[np.ndarray], params: FitParams):
    """Yield (rows, (scores, distances, positions within rows)) for batches of whole labels ranked in Ray
    tasks; at most two tasks per CPU in flight, so the driver reads one batch's vectors at a time."""
    import ray

    if not groups:
        return
    cpus, _ = cluster_resources()
    total = sum(len(r) for r in groups) * X.shape[1] * 4
    budget = max(1, min(LABEL_TASK_BYTES, total // (4 * cpus)))  # enough tasks to keep every CPU busy
    task, pending = ray.remote(rank_within_groups), {}
    try:
        for batch in label_batches(groups, X.shape[1], budget):
            if len(pending) >= 2 * cpus:
                done, _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(done[0]), ray.get(done[0])
            rows = np.concatenate(batch)
            bounds = np.r_[0, np.cumsum([len(r) for r in batch])]
            # a plain array, not a memory map: the task's argument goes to the object store, not in-band
            pending[task.remote(np.asarray(X[rows]), bounds, params)] = rows
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])
    finally:  # an error, or a caller that stops reading: no task left running
        for ref in pending:
            ray.cancel(ref)
