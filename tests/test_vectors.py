"""Sources that already hold vectors (``--embedding-column``): no backbone, checked rows, same outputs."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dnnad import DN2
from dnnad.cli import main
from dnnad.core.model import load_model
from tests.helpers import planted


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
    api = DN2(k=2).fit(X, ids=np.array([f"n{i}" for i in range(len(X))], dtype=object))
    model = load_model(str(out / "model"))
    expected = api.score_samples(Q)
    got = np.array([rows[str(i)]["score"] for i in range(len(Q))])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    record = json.loads((out / "run.json").read_text())
    assert record["weights"] is None and model.meta.backbone is None and model.threshold == api.threshold_
