"""Embeddings brought to the driver for the fit and the ranking: every readable row once, in a fixed order."""
import numpy as np
import pyarrow as pa
import pytest


def embedded_blocks(rows: list[tuple]) -> list[pa.Table]:
    """(id, vector, error, label) rows as embed-stage output tables, two rows a block."""
    from ray.data.extensions import ArrowTensorArray

    tables = []
    for i in range(0, len(rows), 2):
        part = rows[i:i + 2]
        tables.append(pa.table({
            "id": pa.array([r[0] for r in part], pa.string()),
            "embedding": ArrowTensorArray.from_numpy(np.array([r[1] for r in part], np.float32)),
            "status": pa.array(["error" if r[2] else "ok" for r in part], pa.string()),
            "error": pa.array([r[2] for r in part], pa.string()),
            "label": pa.array([r[3] for r in part], pa.string()),
        }))
    return tables


@pytest.mark.ray
def test_collect_sorts_readable_rows_by_id_and_keeps_errors_apart(ray_local):
    import ray.data

    from dnnad.stages.collect import collect

    rows = [("c", [3.0, 0.0], None, "cat"), ("bad", [0.0, 0.0], "cannot identify image file", None),
            ("a", [1.0, 0.0], None, "ant"), ("b", [2.0, 0.0], None, "bee"),
            ("z", [0.0, 0.0], "empty file", None), ("d", [4.0, 0.0], None, "dog")]
    emb = collect(ray.data.from_arrow(embedded_blocks(rows)))
    assert emb.ids.tolist() == ["a", "b", "c", "d"]
    assert emb.X.dtype == np.float32 and emb.X.flags.c_contiguous
    np.testing.assert_array_equal(emb.X[:, 0], [1, 2, 3, 4])
    assert emb.extra["label"].tolist() == ["ant", "bee", "cat", "dog"]
    assert sorted(emb.errors.to_pylist(), key=lambda r: r["id"]) == [
        {"id": "bad", "error": "cannot identify image file"}, {"id": "z", "error": "empty file"}]


@pytest.mark.ray
def test_equal_ids_are_ordered_by_their_vectors_whatever_order_they_arrive_in(ray_local):
    import ray.data

    from dnnad.stages.collect import collect

    rows = [("x", [2.0, 1.0], None, "p"), ("w", [9.0, 9.0], None, "q"), ("x", [1.0, 5.0], None, "r"),
            ("x", [1.0, 2.0], None, "s")]
    first = collect(ray.data.from_arrow(embedded_blocks(rows)))
    again = collect(ray.data.from_arrow(embedded_blocks(rows[::-1])))
    assert first.ids.tolist() == again.ids.tolist() == ["w", "x", "x", "x"]
    np.testing.assert_array_equal(first.X, again.X)
    assert first.extra["label"].tolist() == again.extra["label"].tolist() == ["q", "p", "s", "r"]  # by bytes


@pytest.mark.unit
def test_rows_taken_from_a_disk_array_stay_on_disk_in_the_order_asked():
    """The driver's collected rows live in disk arrays: a subset (a round's kept rows, one label's rows) is
    made on disk too, chunk by chunk, equal to numpy's own fancy indexing."""
    from dnnad.core.arrays import ROW_CHUNK, disk_array, on_disk, take_rows
    from dnnad.stages.collect import sort_order

    X = disk_array((ROW_CHUNK + 5, 3), np.float32)
    X[:] = np.random.default_rng(0).normal(size=X.shape)
    rows = np.random.default_rng(1).permutation(len(X))[: ROW_CHUNK + 2]
    sub = take_rows(X, rows)
    assert on_disk(sub) and sub.dtype == np.float32
    np.testing.assert_array_equal(sub, np.asarray(X)[rows])
    assert not on_disk(take_rows(np.asarray(X), rows))
    assert take_rows(X, np.zeros(0, np.int64)).shape == (0, 3)
    ids = np.array(["e", "a", "d", "a", "b"], dtype=object)  # a repeated id: ordered by its vector's bytes
    V = np.array([[5, 0], [1, 9], [4, 0], [1, 2], [2, 0]], np.float32)
    order = sort_order(ids, V)
    assert ids[order].tolist() == ["a", "a", "b", "d", "e"] and V[order][:2, 1].tolist() == [2, 9]


@pytest.mark.ray
def test_ray_address_means_a_cluster_whose_hosts_may_not_share_files(ray_local, monkeypatch):
    from dnnad.runtime import files_reach_every_actor

    assert files_reach_every_actor()  # Ray started here, on this machine alone
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # how `ray job submit` runs a driver
    assert not files_reach_every_actor()
