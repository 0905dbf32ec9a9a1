"""The Ray batch job end to end: real local Ray, real FAISS, real Parquet on disk."""
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dnnad import DN2
from dnnad.cli import main
from dnnad.core.model import load_model
from dnnad.stages.embed import Embedder
from dnnad.vision.specs import get_spec
from dnnad.vision.weights import resolve_weights
from tests.helpers import CIFAR, FAST, cifar_rows, read_scores


def local_embeddings(root, ids):
    """The job's embedding code called in this process, for brute-force comparisons."""
    spec = get_spec("resnet18", 32)
    emb = Embedder(spec, resolve_weights(spec, "none").state_dict, device="cpu")
    out = emb({"id": np.array(ids, dtype=object), "path": np.array([str(root / i) for i in ids], dtype=object)})
    assert set(out["status"].to_pylist()) == {"ok"}
    return np.stack(out["embedding"].to_numpy(zero_copy_only=False))


@pytest.fixture(scope="module")
def one_shard_run(ray_local, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["score", "--normal", str(corpus.normal), "--query", str(corpus.query),
                 "--out", str(out), "--shards", "1", *FAST]) == 0
    return out


@pytest.mark.ray
def test_every_file_gets_exactly_one_row_and_corrupt_files_are_error_rows(one_shard_run, corpus):
    t = read_scores(one_shard_run)
    ids = t["id"].to_pylist()
    assert sorted(ids) == sorted(corpus.good + corpus.bad) and len(set(ids)) == len(ids)
    rows = {r["id"]: r for r in t.to_pylist()}
    assert "truncated" in rows["corrupt/truncated.jpg"]["error"]
    assert "not an image" in rows["corrupt/text.png"]["error"]
    assert "empty file" in rows["corrupt/empty.jpg"]["error"]
    for i in corpus.bad:
        assert rows[i]["status"] == "error" and rows[i]["score"] is None
    for i in corpus.good:
        r = rows[i]
        assert r["status"] == "ok" and math.isfinite(r["score"]) and r["error"] is None
        assert len(r["neighbor_ids"]) == 2 and r["score"] == pytest.approx(np.mean(r["neighbor_dists"]))
        assert r["is_anomaly"] == (r["score"] > json.loads((one_shard_run / "run.json").read_text())["threshold"])
    record = json.loads((one_shard_run / "run.json").read_text())
    assert record["rows"] == {"ok": 200, "error": 3}
    assert record["weights"] == "none" and "RANDOM-INIT" in record["warning"]
    assert {"embed normal", "fit index + threshold", "embed + score query"} <= set(record["timings_s"])


@pytest.mark.ray
def test_four_shards_equal_one_shard_equal_brute_force_and_library_api(one_shard_run, corpus, tmp_path):
    out4 = tmp_path / "out4"
    assert main(["score", "--normal", str(corpus.normal), "--query", str(corpus.query),
                 "--out", str(out4), "--shards", "4", "--score-actors", "2", *FAST]) == 0
    t1, t4 = read_scores(one_shard_run), read_scores(out4)
    assert t1["id"].to_pylist() == t4["id"].to_pylist()
    assert t1["neighbor_ids"].to_pylist() == t4["neighbor_ids"].to_pylist()
    np.testing.assert_array_equal(t1["score"].to_numpy(zero_copy_only=False), t4["score"].to_numpy(zero_copy_only=False))
    assert load_model(str(out4 / "model")).meta.n_shards == 4

    model = load_model(str(one_shard_run / "model"))
    Xn = np.concatenate([s.vectors for s in model.shards])
    ok = t1.filter(pa.compute.field("status") == "ok")
    Xq = model.transform.transform(local_embeddings(corpus.query, ok["id"].to_pylist()))  # the default l2 read-out
    D = np.sqrt(((Xq[:, None, :].astype(np.float64) - Xn[None]) ** 2).sum(-1))
    nn = np.argsort(D, axis=1, kind="stable")[:, :2]
    job_scores = ok["score"].to_numpy()
    np.testing.assert_allclose(job_scores, np.take_along_axis(D, nn, 1).mean(1), rtol=1e-4)
    assert ok["neighbor_ids"].to_pylist() == model.ids[nn].tolist()

    api = DN2(k=2).fit(Xn, ids=model.ids)  # the index holds the transformed (unit-length) vectors
    np.testing.assert_allclose(api.anomaly_score(Xq), job_scores, rtol=1e-4)
    assert api.ids_[api.kneighbors(Xq)[1]].tolist() == ok["neighbor_ids"].to_pylist()
    np.testing.assert_array_equal(np.sort(api.loo_scores_), model.calibration_scores)  # same core, bit for bit
    assert api.threshold_ == model.threshold


@pytest.mark.ray
def test_saved_model_is_reused_without_re_embedding_the_normal_set(one_shard_run, corpus, tmp_path):
    out = tmp_path / "again"
    assert main(["score", "--model", str(one_shard_run / "model"), "--query", str(corpus.query),
                 "--out", str(out), *FAST]) == 0
    record = json.loads((out / "run.json").read_text())
    assert "embed normal" not in record["timings_s"]
    a, b = read_scores(one_shard_run), read_scores(out)
    assert a.select(["id", "score", "neighbor_ids", "is_anomaly"]).equals(b.select(["id", "score", "neighbor_ids", "is_anomaly"]))


@pytest.mark.ray
def test_finished_output_needs_overwrite(one_shard_run, corpus, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(one_shard_run, out)
    before = sorted(p.name for p in out.iterdir())
    args = ["score", "--model", str(out / "model"), "--query", str(corpus.query), "--out", str(out), *FAST]
    assert main(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert main([*args, "--overwrite"]) == 0
    assert read_scores(out).num_rows == 203


@pytest.mark.ray
def test_parquet_uri_source_with_row_filter_and_null_bytes(ray_local, tmp_path):
    rows = cifar_rows("test", None, 60)
    data = rows.column("image").to_pylist()
    data[7] = None
    table = rows.set_column(rows.schema.get_field_index("image"), "image", pa.array(data, pa.binary()))
    pq.write_table(table, tmp_path / "query.parquet")
    out = tmp_path / "out"
    assert main(["score", "--normal", str(CIFAR), "--normal-filter", "split=train", "--normal-filter", "label=3",
                 "--normal-sample", "50", "--query", (tmp_path / "query.parquet").as_uri(), "--out", str(out), *FAST]) == 0
    t = read_scores(out)
    assert sorted(t["id"].to_pylist()) == sorted(rows["id"].to_pylist())
    bad = t.filter(pa.compute.field("status") == "error").to_pylist()
    assert [(r["id"], r["error"]) for r in bad] == [(rows["id"][7].as_py(), "null image bytes")]
    assert t["label"].to_pylist() == [r["label"] for r in sorted(rows.to_pylist(), key=lambda r: r["id"])]
    normal_ids = load_model(str(out / "model")).ids
    assert len(normal_ids) == 50 and all(i.startswith("train/cat/") for i in normal_ids)


@pytest.mark.ray
@pytest.mark.parametrize("extra,message", [
    (["--normal-filter", "colour=red"], "filter column 'colour' not in the Parquet schema"),
    (["--k", "0"], "--k must be between 1"),
    (["--backbone", "vgg11"], "unknown backbone"),
])
def test_bad_configuration_fails_before_any_work(ray_local, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    rc = main(["score", "--normal", str(CIFAR), "--query", str(CIFAR), "--out", str(out), *FAST, *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.unit
def test_missing_path_is_a_config_error(tmp_path, capsys):
    assert main(["score", "--normal", str(tmp_path / "nope"), "--query", str(tmp_path), "--out",
                 str(tmp_path / "o"), *FAST]) == 2
    assert "--normal path not found" in capsys.readouterr().err


@pytest.mark.ray
def test_group_scores_equal_mean_pooled_computation_by_hand(ray_local, tmp_path):
    from tests.helpers import write_folder

    normal, query = tmp_path / "normal", tmp_path / "query"
    for g in range(6):
        write_folder(normal, cifar_rows("train", 1, 10, offset=10 * g), sub=f"batch{g}")
    write_folder(query, cifar_rows("train", 1, 10, offset=100), sub="cars")
    write_folder(query, cifar_rows("train", 6, 12), sub="frogs")
    out = tmp_path / "out"
    assert main(["score", "--normal", str(normal), "--query", str(query), "--group-by", "dir:1",
                 "--out", str(out), *FAST]) == 0
    t = read_scores(out)
    assert t["id"].to_pylist() == ["cars", "frogs"] and t["n_members"].to_pylist() == [10, 12]

    def pooled(root):
        groups = sorted(p.name for p in root.iterdir())
        return np.stack([local_embeddings(root, sorted(f"{g}/{f.name}" for f in (root / g).iterdir())).mean(0)
                         for g in groups])

    expected = DN2(k=2, normalize="l2").fit(pooled(normal)).anomaly_score(pooled(query))
    np.testing.assert_allclose(t["score"].to_numpy(), expected, rtol=1e-4)


@pytest.mark.ray
def test_job_and_library_agree_on_the_threshold_of_a_reduced_fit(ray_local, corpus, tmp_path):
    out = tmp_path / "reduced"
    assert main(["score", "--normal", str(corpus.normal), "--query", str(corpus.normal), "--out", str(out),
                 "--reduce", "kmeans:20", "--runtime", "torch", *FAST]) == 0  # the embeddings bit for bit
    model = load_model(str(out / "model"))
    ids = sorted(p.name for p in corpus.normal.iterdir())
    api = DN2(k=2, reduce=20, normalize="l2").fit(local_embeddings(corpus.normal, ids), ids=np.array(ids, dtype=object))
    assert api.threshold_ == model.threshold and api.ids_.tolist() == model.ids.tolist()
    np.testing.assert_array_equal(np.sort(api.loo_scores_), model.calibration_scores)
