"""The sharded FAISS index: exact, shard-layout invariant, equal to brute force."""
import numpy as np
import pytest

from dnnad.core.index import build_index


def brute_force(Xq, Xb, k, exclude_self=False):
    D = np.sqrt(((Xq[:, None, :].astype(np.float64) - Xb[None].astype(np.float64)) ** 2).sum(-1))
    if exclude_self:
        np.fill_diagonal(D, np.inf)
    I = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, I, 1), I


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 64)).astype(np.float32), rng.normal(size=(300, 64)).astype(np.float32)


def test_one_and_four_shards_agree_with_brute_force(data):
    Xb, Xq = data
    d1, i1 = build_index(Xb, n_shards=1).search(Xq, 5)
    d4, i4 = build_index(Xb, n_shards=4).search(Xq, 5)
    D, I = brute_force(Xq, Xb, 5)
    np.testing.assert_array_equal(i1, i4)
    np.testing.assert_array_equal(d1, d4)  # bit-identical, whatever the shard layout
    np.testing.assert_array_equal(i1, I)
    np.testing.assert_allclose(d1, D, rtol=1e-12)


def test_self_exclusion_never_returns_the_query_row(data):
    Xb, _ = data
    index = build_index(Xb, n_shards=3)
    d, i = index.search(Xb, 2, exclude=[np.array([p]) for p in range(len(Xb))])
    assert not (i == np.arange(len(Xb))[:, None]).any()
    D, I = brute_force(Xb, Xb, 2, exclude_self=True)
    np.testing.assert_array_equal(i, I)


@pytest.mark.parametrize("kind,min_recall", [("ivf", 0.8), ("hnsw", 0.9)])
def test_approximate_indexes_recall(data, kind, min_recall):
    Xb, Xq = data
    _, I = brute_force(Xq, Xb, 2)
    _, i = build_index(Xb, n_shards=2, kind=kind).search(Xq, 2)
    recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(i, I)])
    assert recall >= min_recall


def test_k_larger_than_reference_set_is_an_error(data):
    Xb, Xq = data
    with pytest.raises(ValueError, match="needs at least"):
        build_index(Xb[:3]).search(Xq, 4)


def test_nan_embeddings_are_rejected():
    X = np.ones((4, 3), dtype=np.float32)
    X[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(X)
