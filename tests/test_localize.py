"""Localisation (--localize): patch maps from a memory bank of normal patches, where an image is anomalous."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dnnad.cli import main
from dnnad.config import ConfigError, EmbedConfig, IndexConfig, JobConfig, SourceConfig
from dnnad.core.localize import PatchDN2, map_scores
from dnnad.core.model import ModelError, load_model, save_model, with_bank
from dnnad.core.patches import (
    border_calibration,
    calibrate_map,
    coreset_chunks,
    greedy_coreset,
    map_to_image,
    peak,
    resize_map,
    ring_index,
    score_map,
    smooth_map,
)


def textures(n, h=6, w=6, d=8, seed=0):
    """Patch grids of a 'normal' texture: every patch one of four prototypes plus a little noise."""
    protos = np.random.default_rng(0).normal(size=(4, d))
    rng = np.random.default_rng(seed + 1)
    return (protos[rng.integers(0, 4, size=(n, h, w))] + 0.05 * rng.normal(size=(n, h, w, d))).astype(np.float32)


@pytest.mark.unit
def test_bilinear_resize_matches_torch_interpolate():
    import torch
    import torch.nn.functional as F

    m = np.random.default_rng(0).random((5, 7))
    ref = F.interpolate(torch.from_numpy(m)[None, None], size=(13, 4), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(resize_map(m, 13, 4), ref.numpy(), atol=1e-12)


@pytest.mark.unit
def test_greedy_coreset_keeps_the_fraction_and_the_rare_patches():
    rng = np.random.default_rng(1)
    X = rng.normal(0, 0.1, size=(8000, 16)).astype(np.float32)
    rare = rng.choice(8000, 20, replace=False)
    X[rare] += rng.normal(0, 5, size=(20, 16)).astype(np.float32)  # 20 patches unlike the rest
    keep = greedy_coreset(X, 0.01, per_image=100)
    assert len(keep) == 80 and np.all(np.diff(keep) > 0)
    assert set(rare) <= set(keep)  # a random 1 % would keep about none of them


@pytest.mark.unit
def test_coreset_chunks_hold_whole_images():
    chunks = coreset_chunks(10, 30_000)
    assert chunks[0] == (0, 2) and chunks[-1] == (10, 10) or chunks[-1][1] == 10
    assert sum(b - a for a, b in chunks) == 10


@pytest.mark.unit
def test_patch_map_finds_the_defect_and_threshold_leaves_each_image_out():
    normal = textures(20)
    est = PatchDN2(coreset=None, image_size=48).fit(normal)
    assert est.index_.ntotal == 20 * 36 and est.grid_ == (6, 6)
    assert (est.loo_scores_ > 0).all()  # a normal image never matches its own patches
    query = textures(3, seed=5)
    query[1, 4, 2] += 3.0  # one patch unlike any normal one
    maps = est.anomaly_maps(query)
    assert np.unravel_index(maps[1].argmax(), (6, 6)) == (4, 2)
    scores = est.anomaly_score(query)
    assert scores[1] > 3 * est.threshold_ and max(scores[0], scores[2]) < 1.5 * est.threshold_
    assert est.predict(query)[1] == -1
    s = smooth_map(maps[1], 48)
    x, y = peak(s, 120, 60)  # an image 60 wide, 120 high seen whole at 48 x 48
    assert 20 <= x <= 40 and 80 <= y <= 110


@pytest.mark.unit
def test_leave_one_image_out_when_only_one_image_has_a_patch():
    normal = textures(6)
    normal[0, 0, 0] += 4.0  # image 0's own patch: the only one like it
    est = PatchDN2(coreset=None, image_size=24).fit(normal)
    assert est.loo_scores_[0] == est.loo_scores_.max() and est.loo_scores_[0] > 2 * np.median(est.loo_scores_)


@pytest.mark.unit
def test_coreset_bank_keeps_a_fraction_and_still_finds_the_defect():
    normal = textures(40)
    est = PatchDN2(coreset=0.1, image_size=48).fit(normal)
    assert est.index_.ntotal == round(40 * 36 * 0.1)
    query = textures(1, seed=9)
    query[0, 1, 1] += 3.0
    assert np.unravel_index(est.anomaly_maps(query)[0].argmax(), (6, 6)) == (1, 1)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["sq8", "ivfpq"])
def test_compressed_bank_maps_as_the_flat_bank_does(kind):
    """A compressed bank (codes in memory, candidates re-ranked by exact distance) gives the flat bank's maps
    (sq8 scans every code; IVF-PQ probes some lists, so a patch may get a farther true distance, never a
    nearer one); scored from its codes alone (``approximate``) it stays close and still finds the defect."""
    normal = textures(300)
    query = textures(4, seed=9)
    query[2, 3, 1] += 3.0
    flat = PatchDN2(coreset=None, image_size=48).fit(normal)
    exact = PatchDN2(coreset=None, image_size=48, index=kind).fit(normal)
    approx = PatchDN2(coreset=None, image_size=48, index=kind, approximate=True).fit(normal)
    assert exact.index_.kind == kind and exact.index_.shards[0].faiss_bytes is not None
    got, want = exact.anomaly_maps(query), flat.anomaly_maps(query)
    if kind == "sq8":
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(exact.loo_scores_, flat.loo_scores_, rtol=1e-6)
    else:
        assert (got >= want - 1e-6).all() and np.isclose(got, want, rtol=1e-6).mean() > 0.8
    maps = approx.anomaly_maps(query)
    assert np.unravel_index(maps[2].argmax(), (6, 6)) == (3, 1) and approx.predict(query)[2] == -1
    assert np.median(np.abs(maps - flat.anomaly_maps(query))) < 0.2 * np.median(flat.anomaly_maps(query))


def padded_textures(n, seed, noise=0.3, side=8):
    """``textures`` whose outermost ring of patches is noisier, as zero padding makes real edge patches."""
    g = textures(n, h=side, w=side, seed=seed)
    edge = ring_index(side, side, 1) == 0
    g[:, edge] += np.random.default_rng(seed).normal(0, noise, size=(n, edge.sum(), g.shape[-1])).astype(np.float32)
    return g


@pytest.mark.unit
def test_border_calibration_puts_every_ring_on_the_interior_scale():
    assert ring_index(5, 7).tolist()[2] == [0, 1, 2, 2, 2, 1, 0]
    r = ring_index(9, 9, rings=2)
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(200, 9, 9)) * np.array([3.0, 2.0, 1.0])[r] + np.array([5.0, 3.0, 1.0])[r]
    stats = border_calibration(maps, rings=2)
    np.testing.assert_allclose(stats, [[5, 3, 1], [3, 2, 1]], atol=0.2)
    cal = calibrate_map(maps, stats)
    for i in range(3):  # each ring now has the interior ring's mean and spread
        np.testing.assert_allclose([cal[:, r == i].mean(), cal[:, r == i].std()], stats[:, 2], rtol=1e-9)
    assert calibrate_map(maps, None) is not None and np.array_equal(calibrate_map(maps, None), maps)
    small = border_calibration(maps[:, :3, :3], rings=2)  # a 3 x 3 grid has no ring 2: it takes ring 1's
    np.testing.assert_array_equal(small[:, 2], small[:, 1])


@pytest.mark.unit
def test_noisy_border_patches_do_not_outscore_an_interior_defect():
    from sklearn.metrics import roc_auc_score

    normal, query = padded_textures(40, seed=0), padded_textures(10, seed=7)
    query[5:, 4, 3] += 0.6  # a faint defect in the interior of the last five
    y = [0] * 5 + [1] * 5
    raw = PatchDN2(coreset=None, image_size=64, calibrate_border=False).fit(normal)
    est = PatchDN2(coreset=None, image_size=64).fit(normal)
    assert raw.border_ is None and est.border_.shape == (2, 7) and est.border_[0, 0] > 3 * est.border_[0, -1]
    assert roc_auc_score(y, raw.anomaly_score(query)) < 0.6  # the raw maximum sits on the noisy edge
    assert roc_auc_score(y, est.anomaly_score(query)) == 1.0
    assert (est.predict(query[:5]) == 1).sum() >= 4 and (est.predict(query[5:]) == -1).all()
    m = map_to_image(est.anomaly_maps(query[5:6])[0], 64, 64, 64, stats=est.border_)
    assert abs(m.max() - est.anomaly_score(query[5:6])[0]) < 1e-9  # the documented map is the scored one
    assert np.hypot(*(np.array(np.unravel_index(m.argmax(), m.shape)) - [4.5 * 8, 3.5 * 8])) < 8


@pytest.mark.unit
def test_bank_shard_groups_give_the_maps_of_one_search():
    """``--shard-groups``: each group's actor lowers the per-patch minimum, the last turns it into maps; what
    one actor holding the whole bank gives, also leaving each normal image's own patches out."""
    from dnnad.core.index import build_shard
    from dnnad.stages.localize import Bank, PatchGroupSearch, PatchScorer, check_groups_leave_patches

    normal = textures(12, h=5, w=5)
    bank_rows = normal.reshape(-1, 8)
    shards = [build_shard(bank_rows[a:b], a) for a, b in [(0, 100), (100, 200), (200, 300)]]
    bank = Bank(shards, np.arange(300) // 25, 40, rows=(100, 100, 100))
    query = normal[[2, 7, 11]].copy()
    query[1, 2, 2] += 3.0

    def batch():
        return {"id": np.array(["02", "07", "11", "x"]), "status": np.array(["ok", "ok", "ok", "error"]),
                "patches": np.concatenate([query, np.zeros((1, 5, 5, 8), np.float32)]),
                "height": np.array([40, 80, 40, 0]), "width": np.array([40, 40, 60, 0])}

    ids = np.array([f"{i:02d}" for i in range(12)])  # the sorted normal ids: row i's own patches are 25i..25i+24
    for exclude in (None, ids):
        one = PatchScorer(bank, [0, 1, 2], exclude_ids=exclude)(batch())
        b = batch()
        for group in ([0], [1, 2]):
            b = PatchGroupSearch(bank, group, exclude_ids=exclude)(b)
        split = PatchScorer(bank, None, exclude_ids=exclude)(b)
        assert "_patch_nn" not in split and "patches" not in split
        for c in ("anomaly_map", "_patch_score", "peak_x", "peak_y"):
            np.testing.assert_array_equal(split[c], one[c])
        assert np.isnan(one["anomaly_map"][3]).all() and one["peak_x"][3] == -1
        own = one["anomaly_map"][0]
        assert (own == 0).all() if exclude is None else (own > 0).all()  # its own patches, or never them
    assert one["image_height"].tolist() == [40, 80, 40, 40] and one["image_width"].tolist() == [40, 40, 60, 40]
    with pytest.raises(ValueError, match="use fewer --shard-groups"):
        PatchGroupSearch(Bank(shards, np.zeros(300, int), 40, rows=(100, 100, 100)), [0], exclude_ids=ids)
    owners = np.repeat(np.arange(12), 25)
    check_groups_leave_patches(owners, [100, 100, 100], [[0], [1, 2]])  # four images a group
    with pytest.raises(ConfigError, match="use fewer groups"):  # the job checks this before any actor starts
        check_groups_leave_patches(owners, [25] * 12, [[i] for i in range(12)])


@pytest.mark.unit
def test_map_to_image_is_the_scored_map_at_the_image_size():
    grid = np.random.default_rng(2).random((6, 6))
    full = map_to_image(grid, 90, 150, 48)
    assert full.shape == (90, 150)
    assert abs(full.max() - map_scores(grid[None], 48)[0]) < 0.02 * full.max()


@pytest.mark.unit
@pytest.mark.parametrize("height,width", [(16, 16), (7, 3), (40, 90), (1, 1)])
def test_a_map_shrunk_to_a_small_image_keeps_the_score_and_the_peak(height, width):
    grid = np.full((12, 12), 0.1)
    grid[8, 10] = 3.0  # one sharp defect cell
    scored = score_map(grid, 96)
    m = map_to_image(grid, height, width, 96)
    assert m.shape == (height, width) and m.max() == scored.max()
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert (int(x), int(y)) == peak(scored, height, width)


@pytest.mark.unit
def test_localizing_model_round_trips_and_damage_is_refused(tmp_path):
    from dnnad.core.dn2 import FitParams, fit_reference
    from dnnad.core.index import build_shard
    from dnnad.core.model import model_from_fit

    rng = np.random.default_rng(0)
    fit = fit_reference(rng.normal(size=(10, 4)).astype(np.float32), None, FitParams())
    model = model_from_fit(fit, fit.handle.shards, FitParams())
    bank = rng.normal(size=(30, 8)).astype(np.float32)
    loc = with_bank(model, [build_shard(bank[:15], 0), build_shard(bank[15:], 15)], np.arange(30) // 3,
                    np.linspace(1, 2, 4), 1.9, (1, 3, 8), 0.5,  # the threshold from a sample of 4 of the 10
                    border=np.array([[0.5, 0.4], [0.2, 0.1]]))
    save_model(loc, str(tmp_path / "m"))
    back = load_model(str(tmp_path / "m"))
    assert back.meta.localize and back.meta.patch_grid == [1, 3, 8] and back.meta.coreset == 0.5
    np.testing.assert_array_equal(np.concatenate([s.vectors for s in back.bank]), bank)
    np.testing.assert_array_equal(back.bank_owners, np.arange(30) // 3)
    assert back.threshold == 1.9 and len(back.shards) == len(model.shards) and back.meta.n_calibration == 4
    assert back.meta.border_calibration == [[0.5, 0.4], [0.2, 0.1]]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["meta"]["border_calibration"] = [[0.5, 0.4], [0.2, 0.0]]  # a zero spread would divide by zero
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="border calibration is damaged"):
        load_model(str(tmp_path / "m"))
    save_model(loc, str(tmp_path / "m2"))
    (tmp_path / "m2" / "bank_owners.npy").unlink()
    with pytest.raises(ModelError, match="damaged"):
        load_model(str(tmp_path / "m2"))


@pytest.mark.unit
@pytest.mark.parametrize("change, message", [
    ({"kind": "rank"}, "score or audit"),
    ({"index": IndexConfig(coreset=0.0)}, "--coreset must be"),
    ({"embed": EmbedConfig(localize=True, backbone="onnx:/x.onnx")}, "stages are known"),
    ({"embed": EmbedConfig(localize=True, tta="flip")}, "drop --tta"),
    ({"explicit": ("resize",)}, "drop --resize crop"),
    ({"query": SourceConfig("/q.parquet", embedding_column="v")}, "--embedding-column"),
    ({"index": IndexConfig(reduce=10)}, "drop --reduce"),
    ({"embed": EmbedConfig(localize=True, decode="reduced")}, "drop --decode reduced"),
    ({"index": IndexConfig(kind="hnsw")}, "hnsw would hold more than flat"),
])
def test_bad_localize_settings_are_one_line_errors(change, message):
    base = dict(kind="score", out="/tmp/o", normal=SourceConfig("/n"), query=SourceConfig("/q"),
                embed=EmbedConfig(localize=True))
    with pytest.raises(ConfigError, match=message):
        JobConfig(**{**base, **change}).validate()


@pytest.mark.unit
def test_coreset_without_localize_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs --localize"):
        JobConfig("score", "/tmp/o", SourceConfig("/n"), SourceConfig("/q"), index=IndexConfig(coreset=0.2),
                  explicit=("coreset",)).validate()
    # with --model a saved model may decide --localize: accepted here, checked once the job knows it fits
    JobConfig("audit", "/tmp/o", None, SourceConfig("/q"), index=IndexConfig(coreset=0.2), model_dir="/tmp/m",
              explicit=("coreset",)).validate()
    (tmp_path / "images").mkdir()
    code = main(["score", "--normal", str(tmp_path / "images"), "--query", str(tmp_path / "images"), "--out",
                 str(tmp_path / "o"), "--model", str(tmp_path / "new-model"), "--coreset", "0.2", "--quiet"])
    assert code == 2 and "needs --localize" in capsys.readouterr().err  # a fit into a new --model directory


def tile(rng, defect=None, size=(128, 96)):
    """A grey striped tile (width x height); ``defect``: (x, y) of a dark 20 px blob."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    a = 128 + 40 * np.sin((xx + rng.uniform(0, 8)) * 0.8) + rng.normal(0, 6, (h, w))
    if defect is not None:
        x, y = defect
        a[max(0, y - 10):y + 10, max(0, x - 10):x + 10] = 20
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


LOCALIZE = ["--backbone", "efficientnet_lite0", "--image-size", "96", "--localize", "--quiet"]


@pytest.fixture(scope="module")
def localized(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("localize")
    rng = np.random.default_rng(0)
    (root / "normal").mkdir()
    (root / "query").mkdir()
    for i in range(16):
        tile(rng).save(root / "normal" / f"{i}.png")
    for i in range(3):
        tile(rng).save(root / "query" / f"ok{i}.png")
    defects = {"defect_a.png": (30, 70), "defect_b.png": (100, 20)}
    for name, xy in defects.items():
        tile(rng, xy).save(root / "query" / name)
    (root / "query" / "broken.png").write_bytes(b"not a png")
    out = root / "out"
    assert main(["score", "--normal", str(root / "normal"), "--query", str(root / "query"), "--out", str(out),
                 "--model", str(root / "model"), *LOCALIZE]) == 0
    return root, out, defects


@pytest.mark.ray
def test_localize_maps_every_row_and_peaks_on_the_defect(localized):
    root, out, defects = localized
    t = pq.read_table(out / "scores").to_pandas().set_index("id")
    assert sorted(t.index) == sorted(p.name for p in (root / "query").iterdir())
    assert t.loc["broken.png", "status"] == "error" and "not an image" in t.loc["broken.png", "error"]
    ok = t[t.status == "ok"]
    assert (ok.map_height * ok.map_width == ok.anomaly_map.map(len)).all() and (ok.map_height == 12).all()
    assert ok.loc[list(defects), "score"].min() > ok.drop(index=list(defects)).score.max()
    assert ok.loc[list(defects), "is_anomaly"].all()
    for name, (x, y) in defects.items():
        assert abs(ok.loc[name, "peak_x"] - x) <= 16 and abs(ok.loc[name, "peak_y"] - y) <= 16
    # the documented function gives the score back from the stored map
    r = ok.loc["defect_a.png"]
    grid = np.asarray(r.anomaly_map).reshape(int(r.map_height), int(r.map_width))
    border = np.array(load_model(str(root / "model")).meta.border_calibration)
    assert abs(map_scores(grid[None], 96, border=border)[0] - r.score) < 1e-4
    assert (ok.image_height == 96).all() and (ok.image_width == 128).all()  # the tiles' own size
    on_image = map_to_image(grid, r.image_height, r.image_width, 96, stats=border)  # floats: the column has NaN
    assert on_image.shape == (96, 128) and abs(on_image.max() - r.score) < 0.05 * r.score
    assert np.isnan(t.loc["broken.png", "image_height"]) and len(t.loc["broken.png", "anomaly_map"]) == 0


@pytest.mark.ray
def test_localize_model_records_the_bank_and_scores_again_identically(localized, tmp_path):
    root, out, _ = localized
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["localize"] and record["model"]["patch_grid"] == [12, 12, 40 + 112]
    again = tmp_path / "again"
    assert main(["score", "--model", str(root / "model"), "--query", str(root / "query"), "--out", str(again),
                 "--quiet"]) == 0
    a = pq.read_table(out / "scores").to_pandas().sort_values("id").reset_index(drop=True)
    b = pq.read_table(again / "scores").to_pandas().sort_values("id").reset_index(drop=True)
    assert a.score.equals(b.score) and all(np.array_equal(x, y) for x, y in zip(a.anomaly_map, b.anomaly_map))


def sorted_scores(out: Path):
    return pq.read_table(out / "scores").to_pandas().sort_values("id").reset_index(drop=True)


def fit_bank_and_rescore(root: Path, to: Path, *flags: str):
    """Fit a localising model with ``flags`` and score the query with it; then score again from the saved
    model. Returns the fit's scores and the reload's."""
    assert main(["score", "--normal", str(root / "normal"), "--query", str(root / "query"), "--out", str(to / "out"),
                 "--model", str(to / "model"), *flags, *LOCALIZE]) == 0
    assert main(["score", "--model", str(to / "model"), "--query", str(root / "query"), "--out", str(to / "again"),
                 "--quiet"]) == 0
    return sorted_scores(to / "out"), sorted_scores(to / "again")


@pytest.mark.ray
def test_compressed_bank_is_saved_with_its_codes_and_maps_like_the_flat_one(localized, tmp_path):
    root, out, _ = localized
    b, c = fit_bank_and_rescore(root, tmp_path, "--index", "sq8")
    model = load_model(str(tmp_path / "model"))
    assert model.meta.index_kind == "sq8" and all(s.faiss_bytes is not None for s in model.bank)
    assert isinstance(model.bank[0].vectors, np.memmap)  # loaded locally: codes in memory, vectors on disk
    a = sorted_scores(out)
    ok = a.status == "ok"
    np.testing.assert_allclose(np.stack(b.anomaly_map[ok]), np.stack(a.anomaly_map[ok]), rtol=1e-5)
    assert all(np.array_equal(x, y) for x, y in zip(b.anomaly_map[ok], c.anomaly_map[ok]))


@pytest.mark.ray
def test_approximate_bank_scores_from_its_codes_through_the_job(localized, tmp_path):
    """--approximate: the job's bank actors and the saved model score from the sq8 codes alone (close to the
    flat maps, not equal to them), and a reload scores as the fit did."""
    root, out, _ = localized
    b, c = fit_bank_and_rescore(root, tmp_path, "--index", "sq8", "--approximate")
    assert load_model(str(tmp_path / "model")).meta.approximate
    a = sorted_scores(out)
    ok = a.status == "ok"
    flat, codes = np.stack(a.anomaly_map[ok]), np.stack(b.anomaly_map[ok])
    assert not np.allclose(codes, flat, rtol=1e-5)  # code distances, not the exact re-rank
    assert np.median(np.abs(codes - flat)) < 0.05 * np.median(flat)
    assert all(np.array_equal(x, y) for x, y in zip(b.anomaly_map[ok], c.anomaly_map[ok]))


@pytest.mark.ray
def test_report_shows_heatmaps_of_the_top_rows(localized):
    _, out, _ = localized
    html = (out / "report.html").read_text()
    assert html.count('class="heatmap"') == 5 and "anomaly map; peak at" in html


@pytest.mark.ray
def test_more_shard_groups_than_the_index_can_search_is_a_one_line_error(localized, tmp_path, capsys):
    root, _, _ = localized
    code = main(["score", "--normal", str(root / "normal"), "--query", str(root / "query"), "--out", str(tmp_path / "o"),
                 "--coreset", "0.01", "--shards", "16", "--shard-groups", "16", *LOCALIZE])  # ~23 patches, 1-2 a shard
    err = capsys.readouterr().err
    assert code == 2 and "a group of index shards holds 1 reference rows" in err and "Traceback" not in err


@pytest.mark.ray
def test_localize_against_a_model_fitted_without_it_is_refused(ray_local, tmp_path, capsys):
    root = tmp_path
    rng = np.random.default_rng(1)
    (root / "n").mkdir()
    for i in range(4):
        tile(rng).save(root / "n" / f"{i}.png")
    assert main(["score", "--normal", str(root / "n"), "--query", str(root / "n"), "--out", str(root / "o"),
                 "--model", str(root / "m"), "--backbone", "efficientnet_lite0", "--image-size", "64", "--quiet"]) == 0
    code = main(["score", "--model", str(root / "m"), "--query", str(root / "n"), "--out", str(root / "o2"),
                 "--localize", "--quiet"])
    assert code != 0 and "--localize conflicts with the saved model" in capsys.readouterr().err


@pytest.mark.unit
def test_patch_features_are_the_same_in_torch_and_onnx_runtime():
    from dnnad.vision.backbones import FeatureExtractor
    from dnnad.vision.runtimes import export_onnx
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    spec = get_spec("efficientnet_lite0", 64, resize="full", localize=True)
    state = resolve_weights(spec, "imagenet").state_dict
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    emb_t, grid_t = FeatureExtractor(spec, state, "cpu", threads=1).with_patches(x)
    emb_o, grid_o = FeatureExtractor(spec, None, "cpu", threads=1, onnx_model=export_onnx(spec, state)).with_patches(x)
    assert grid_t.shape == (2, 8, 8, 152)
    np.testing.assert_allclose(grid_o, grid_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb_o, emb_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(grid_t[..., :40], axis=-1), 1, atol=1e-5)  # each stage unit-length


@pytest.mark.ray
def test_job_bank_and_threshold_are_the_library_estimators(localized, tmp_path):
    from dnnad.vision.backbones import FeatureExtractor
    from dnnad.vision.decode import decode_image
    from dnnad.vision.preprocess import crop_fn, normalize_batch
    from dnnad.vision.runtimes import cached_export
    from dnnad.vision.specs import get_spec
    from dnnad.vision.weights import resolve_weights

    root, _, _ = localized
    assert main(["score", "--normal", str(root / "normal"), "--query", str(root / "query"), "--out",
                 str(tmp_path / "o"), "--model", str(tmp_path / "m"), "--coreset", "0.05", *LOCALIZE]) == 0
    job = load_model(str(tmp_path / "m"))
    spec = get_spec("efficientnet_lite0", 96, resize="full", localize=True)
    fe = FeatureExtractor(spec, None, "cpu", threads=1,
                          onnx_model=cached_export(spec, resolve_weights(spec, "imagenet").state_dict))
    files = sorted(p.name for p in (root / "normal").iterdir())  # reference order: sorted ids
    assert list(job.ids) == files
    x = normalize_batch(spec, np.stack([crop_fn(spec)(decode_image((root / "normal" / f).read_bytes())) for f in files]))
    lib = PatchDN2(coreset=0.05, image_size=96, quantile=0.99).fit(fe.with_patches(x)[1])
    np.testing.assert_array_equal(np.concatenate([s.vectors for s in job.bank]), lib.index_.vectors(
        np.arange(lib.index_.ntotal)))
    np.testing.assert_array_equal(job.bank_owners, lib.bank_owners_)
    np.testing.assert_allclose(job.meta.border_calibration, lib.border_, rtol=1e-5)
    np.testing.assert_allclose(job.calibration_scores, np.sort(lib.loo_scores_), rtol=1e-5)
    assert job.threshold == pytest.approx(lib.threshold_, rel=1e-6)


@pytest.mark.unit
def test_calibration_takes_every_image_up_to_the_limit_then_a_fixed_sample():
    from dnnad.core.localize import CALIBRATION_IMAGES, calibration_sample

    assert calibration_sample(600).tolist() == list(range(600))
    big = calibration_sample(5000)
    assert len(big) == CALIBRATION_IMAGES == len(set(big)) and np.all(np.diff(big) > 0)
    assert big.tolist() == calibration_sample(5000).tolist()
    est = PatchDN2(coreset=0.1, image_size=24).fit(textures(CALIBRATION_IMAGES + 5, h=3, w=3))
    assert len(est.loo_scores_) == CALIBRATION_IMAGES


@pytest.mark.ray
def test_nightly_audit_with_a_localizing_model_maps_and_summarises_peaks(localized, tmp_path, capsys):
    root, out, defects = localized
    audits = tmp_path / "audits"
    assert main(["audit", "--model", str(root / "model"), "--query", str(root / "query"), "--out", str(audits),
                 "--date", "2026-12-01", "--top", "3", "--coreset", "0.1"]) == 0  # the model's own coreset agrees
    record = json.loads((audits / "runs" / "2026-12-01.json").read_text())
    top = record["summary"]["top"]
    assert {r["id"] for r in top[:2]} == set(defects) and all(r["peak_x"] >= 0 for r in top)
    assert "peak at (" in capsys.readouterr().out
    scores = pq.read_table(audits / "scores").to_pandas().set_index("id")
    first = pq.read_table(out / "scores").to_pandas().set_index("id")
    assert scores.loc["defect_a.png", "score"] == first.loc["defect_a.png", "score"]
    assert (audits / "reports" / "2026-12-01.html").read_text().count('class="heatmap"') == 3


@pytest.mark.unit
def test_preselection_of_a_batch_without_readable_rows_keeps_the_survivor_shape():
    from dnnad.core.patches import preselect_size
    from dnnad.stages.localize import Preselect

    grids = np.zeros((3, 4, 4, 8), np.float32)
    step = Preselect(np.array(["a", "b", "c"]), 0.01)
    empty = step({"id": np.array(["a", "b", "c"], dtype=object), "status": np.array(["error"] * 3, dtype=object),
                  "patches": grids})
    full = step({"id": np.array(["a", "b", "c"], dtype=object), "status": np.array(["ok"] * 3, dtype=object),
                 "patches": textures(3, 4, 4, 8)})
    assert empty["survivors"].shape == (0, preselect_size(16, 0.01), 8) == (0, *full["survivors"].shape[1:])
    assert full["_pos"].tolist() == [0, 1, 2]


@pytest.mark.unit
def test_estimator_refuses_a_coreset_outside_zero_to_one():
    with pytest.raises(ValueError, match="coreset must be"):
        PatchDN2(coreset=0).fit(textures(3))


@pytest.mark.unit
def test_block_spans_cover_a_row_range_across_uneven_blocks():
    from dnnad.stages.localize import block_spans

    assert block_spans([3, 0, 4, 2], 2, 8) == {0: (2, 3), 2: (0, 4), 3: (0, 1)}
    assert block_spans([3, 0, 4, 2], 0, 9) == {0: (0, 3), 2: (0, 4), 3: (0, 2)}
    assert block_spans([5], 1, 2) == {0: (1, 2)}


@pytest.mark.unit
def test_coreset_chunk_across_survivor_blocks_keeps_the_rows_of_one_array():
    """The job's stage 2 reads a chunk's images from several object-store blocks; it keeps exactly what
    ``coreset_chunk`` keeps from the same survivors in one array, with each patch's image position."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from dnnad.core.patches import coreset_chunk, coreset_projection
    from dnnad.stages.localize import block_spans, select_chunk

    S = textures(10, 4, 4, 8).reshape(10, 16, 8)  # 10 images' survivors, 16 each
    sizes = [3, 0, 5, 2]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    blocks = [pa.table({"_pos": pa.array(np.arange(a, b)), "survivors": ArrowTensorArray.from_numpy(S[a:b])})
              for a, b in zip(starts[:-1], starts[1:])]
    P = coreset_projection(8)
    spans = block_spans(sizes, 2, 9)
    rows, owners = select_chunk(spans, 0.25, P, *[blocks[i] for i in spans])
    keep = coreset_chunk(S[2:9].reshape(-1, 8), 0.25, P)
    np.testing.assert_array_equal(rows, S[2:9].reshape(-1, 8)[keep])
    np.testing.assert_array_equal(owners, 2 + keep // 16)
    rows, owners = select_chunk(spans, None, P, *[blocks[i] for i in spans])  # coreset 100 %: every survivor
    assert len(rows) == 7 * 16 and owners.tolist() == np.repeat(np.arange(2, 9), 16).tolist()
