"""Sources that already hold vectors (``--embedding-column``): no backbone, checked rows, same outputs."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dnnad import DN2
from dnnad.cli import main
from dnnad.core.model import load_model
from tests.helpers import planted

pytestmark = pytest.mark.ray


def vector_table(X: np.ndarray, ids: list, fixed: bool = True) -> pa.Table:
    flat = pa.array(X.astype(np.float32).ravel())
    vec = (pa.FixedSizeListArray.from_arrays(flat, X.shape[1]) if fixed
           else pa.ListArray.from_arrays(pa.array(np.arange(0, X.size + 1, X.shape[1]), pa.int32()), flat))
    return pa.table({"id": pa.array(ids), "vec": vec})


def test_embedding_column_scores_equal_the_library_and_bad_vectors_are_error_rows(ray_local, tmp_path):
    X, _ = planted(n_normal=300, n_anom=0, d=16, seed=1)
    Q, _ = planted(n_normal=40, n_anom=10, d=16, seed=2)
    pq.write_table(vector_table(X, [f"n{i}" for i in range(len(X))]), tmp_path / "normal.parquet")
    q = vector_table(Q, list(range(len(Q))), fixed=False)
    bad = pa.table({"id": pa.array([1000, 1001, 1002]),
                    "vec": pa.array([[1.0, 2.0], None, [float("nan")] * 16], pa.list_(pa.float32()))})
    pq.write_table(pa.concat_tables([q, bad]), tmp_path / "query.parquet")
    out = tmp_path / "out"
    assert main(["score", "--normal", str(tmp_path / "normal.parquet"), "--query", str(tmp_path / "query.parquet"),
                 "--embedding-column", "vec", "--out", str(out), "--quiet"]) == 0
    t = pq.read_table(out / "scores").to_pylist()
    rows = {r["id"]: r for r in t}
    assert len(t) == 53 and len(rows) == 53
    assert rows["1000"]["error"] == "embedding has 2 values, expected 16"
    assert rows["1001"]["error"] == "null embedding"
    assert rows["1002"]["error"] == "embedding has NaN or inf"
    api = DN2(k=2, normalize="l2").fit(X, ids=np.array([f"n{i}" for i in range(len(X))], dtype=object))
    model = load_model(str(out / "model"))
    expected = api.anomaly_score(Q)
    got = np.array([rows[str(i)]["score"] for i in range(len(Q))])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    record = json.loads((out / "run.json").read_text())
    assert record["weights"] is None and model.meta.backbone is None and model.threshold == api.threshold_


def test_pca_and_approximate_models_score_through_the_job_as_in_the_library(ray_local, tmp_path):
    """``--pca 6 --index sq8 --approximate``: the model keeps 6 dimensions and scores from the codes; a second
    run with ``--model`` reads 16-dimensional queries and gives the same scores as the library."""
    X, _ = planted(n_normal=400, n_anom=0, d=16, seed=1)
    Q, _ = planted(n_normal=30, n_anom=5, d=16, seed=2)
    ids = [f"n{i}" for i in range(len(X))]
    pq.write_table(vector_table(X, ids), tmp_path / "normal.parquet")
    pq.write_table(vector_table(Q, [f"q{i}" for i in range(len(Q))]), tmp_path / "query.parquet")
    flags = ["--embedding-column", "vec", "--quiet"]
    assert main(["score", "--normal", str(tmp_path / "normal.parquet"), "--query", str(tmp_path / "query.parquet"),
                 "--pca", "6", "--index", "sq8", "--approximate", "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "fit"), *flags]) == 0
    model = load_model(str(tmp_path / "m"))
    assert (model.meta.dim, model.meta.query_dim, model.meta.pca, model.meta.approximate) == (6, 16, 6, True)
    assert main(["score", "--model", str(tmp_path / "m"), "--query", str(tmp_path / "query.parquet"),
                 "--out", str(tmp_path / "again"), *flags]) == 0
    api = DN2(k=2, pca=6, index="sq8", approximate=True, normalize="l2").fit(X, ids=np.array(ids, dtype=object))
    for out in ("fit", "again"):
        rows = {r["id"]: r for r in pq.read_table(tmp_path / out / "scores").to_pylist()}
        got = np.array([rows[f"q{i}"]["score"] for i in range(len(Q))])
        np.testing.assert_allclose(got, api.anomaly_score(Q), rtol=1e-5)
    assert model.threshold == pytest.approx(api.threshold_, rel=1e-6)


def test_shard_groups_score_queries_as_one_index_does(ray_local, tmp_path):
    """``--shards 4 --shard-groups 2 --pca 8``: two actor pools each hold half the index; scores and neighbours
    are those of the library's single index, and a batch of error rows only passes through."""
    X, _ = planted(n_normal=300, n_anom=0, d=16, seed=1)
    Q, _ = planted(n_normal=40, n_anom=8, d=16, seed=2)
    ids = [f"n{i:03d}" for i in range(len(X))]
    pq.write_table(vector_table(X, ids), tmp_path / "normal.parquet")
    bad = pa.table({"id": pa.array([f"e{i}" for i in range(16)]), "vec": pa.nulls(16, pa.list_(pa.float32()))})
    good = vector_table(Q, [f"q{i}" for i in range(len(Q))], fixed=False)
    pq.write_table(pa.concat_tables([good, bad]), tmp_path / "query.parquet")
    assert main(["score", "--normal", str(tmp_path / "normal.parquet"), "--query", str(tmp_path / "query.parquet"),
                 "--shards", "4", "--shard-groups", "2", "--pca", "8", "--embedding-column", "vec",
                 "--out", str(tmp_path / "o"), "--score-batch-size", "16", "--quiet"]) == 0
    api = DN2(k=2, pca=8, normalize="l2").fit(X, ids=np.array(ids, dtype=object))
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "o" / "scores").to_pylist()}
    assert len(rows) == len(Q) + 16 and {rows[f"e{i}"]["status"] for i in range(16)} == {"error"}
    dist, pos = api.kneighbors(Q)
    for i in range(len(Q)):
        r = rows[f"q{i}"]
        assert r["neighbor_ids"] == [ids[p] for p in pos[i]]
        np.testing.assert_allclose(r["neighbor_dists"], dist[i], rtol=1e-6)
    assert load_model(str(tmp_path / "o" / "model")).threshold == pytest.approx(api.threshold_, rel=1e-9)


def test_a_vector_dataset_streams_every_selected_row_once_in_scoring_sized_blocks(ray_local, tmp_path):
    """Two files of two row groups each, filtered on a column that is not carried: each selected row is read
    once, in blocks of at most ``VECTOR_ROWS_PER_BLOCK`` rows, by read tasks apart from the scoring actors.

    Apart, the actors score each read task's block as it comes: every scored block holds the rows of one row
    group. A read fused into the actors would read every row group in one actor task and batch the stream
    across row groups (400 does not divide a row group's 1,500 selected rows), mixing them in a block."""
    from dnnad.config import ScoreConfig, SourceConfig
    from dnnad.sources import prepare_source
    from dnnad.stages.read import VECTOR_ROWS_PER_BLOCK, read_source
    from dnnad.stages.score import Scorer
    from dnnad.stages.vectors import vectors

    rng = np.random.default_rng(0)
    (tmp_path / "vectors").mkdir()
    for f, n in enumerate((9_000, 9_000)):
        t = vector_table(rng.normal(size=(n, 8)), [f"{f}-{i}" for i in range(n)])
        t = t.append_column("fold", pa.array(np.arange(n) % 3, pa.int16()))
        pq.write_table(t, tmp_path / "vectors" / f"part-{f}.parquet", row_group_size=4_500)
    pq.write_table(vector_table(rng.normal(size=(50, 8)), [f"n{i}" for i in range(50)]), tmp_path / "normal.parquet")
    assert main(["score", "--normal", str(tmp_path / "normal.parquet"), "--query", str(tmp_path / "normal.parquet"),
                 "--embedding-column", "vec", "--out", str(tmp_path / "fit"), "--quiet"]) == 0

    src = prepare_source(SourceConfig(str(tmp_path / "vectors"), embedding_column="vec", filters=(("fold", "0"),)),
                         "query")
    rows = read_source(src).materialize()
    sizes = [e.metadata.num_rows for bundle in rows.iter_internal_ref_bundles() for e in bundle.blocks]
    assert max(sizes) <= VECTOR_ROWS_PER_BLOCK and len(sizes) >= 4  # 4 row groups, none in one block
    scored = Scorer.of(load_model(str(tmp_path / "fit" / "model")), ScoreConfig(batch_size=400)).map(vectors(
        read_source(src), src.dim)).materialize()
    ids = scored.to_pandas()["id"].tolist()
    expected = {f"{f}-{i}" for f, n in enumerate((9_000, 9_000)) for i in range(0, n, 3)}
    assert len(ids) == len(expected) == src.rows and set(ids) == expected

    def row_group(i: str) -> tuple[str, int]:
        f, row = i.split("-")
        return f, int(row) // 4_500

    blocks = [{row_group(i) for i in b["id"].to_pylist()}
              for b in scored.iter_batches(batch_size=None, batch_format="pyarrow")]  # one batch a block
    assert [len(groups) for groups in blocks] == [1] * len(blocks), blocks  # no block mixes row groups
    assert set().union(*blocks) == {(f, g) for f in "01" for g in (0, 1)}


def test_a_compressed_model_sends_its_rows_to_actors_that_cannot_open_its_files(ray_local, tmp_path):
    """A loaded sq8 model maps its vectors from disk. Its shards reach the scoring actors as file paths where Ray
    runs on this machine alone, and with their rows otherwise (another host has no such file): the scores are
    the same either way."""
    import ray

    from dnnad.config import ScoreConfig, SourceConfig
    from dnnad.runtime import files_reach_every_actor
    from dnnad.sources import prepare_source
    from dnnad.stages.read import read_source
    from dnnad.stages.score import Scorer
    from dnnad.stages.vectors import vectors

    X, _ = planted(n_normal=600, n_anom=0, d=16, seed=3)
    Q, _ = planted(n_normal=60, n_anom=10, d=16, seed=4)
    pq.write_table(vector_table(X, [f"n{i}" for i in range(len(X))]), tmp_path / "normal.parquet")
    pq.write_table(vector_table(Q, list(range(len(Q)))), tmp_path / "query.parquet")
    assert main(["score", "--normal", str(tmp_path / "normal.parquet"), "--query", str(tmp_path / "query.parquet"),
                 "--embedding-column", "vec", "--index", "sq8", "--shards", "2", "--out", str(tmp_path / "fit"),
                 "--quiet"]) == 0
    model = load_model(str(tmp_path / "fit" / "model"))
    assert files_reach_every_actor() and all(isinstance(s.vectors, np.memmap) for s in model.shards)
    src = prepare_source(SourceConfig(str(tmp_path / "query.parquet"), embedding_column="vec"), "query")

    def scores(files_shared: bool) -> tuple[dict, list]:
        scorer = Scorer.of(model, ScoreConfig(), files_shared=files_shared)
        t = scorer.map(vectors(read_source(src), src.dim)).to_pandas()
        return dict(zip(t["id"], t["score"])), [ray.get(ref).vectors for ref in scorer.shards]

    by_path, mapped = scores(True)
    by_rows, held = scores(False)
    assert all(isinstance(v, np.memmap) for v in mapped) and not any(isinstance(v, np.memmap) for v in held)
    assert len(by_rows) == len(Q) and by_rows == by_path
    written = pq.read_table(tmp_path / "fit" / "scores").to_pandas()
    assert by_path == dict(zip(written["id"], written["score"]))
