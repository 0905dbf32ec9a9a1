"""The sharded FAISS index: exact, shard-layout invariant, equal to brute force (ties and duplicates too)."""
import tracemalloc

import numpy as np
import pytest

from dnnad.core.dn2 import duplicate_groups, self_exclusions
from dnnad.core.index import Exclusion, ShardedIndex, build_index, build_shard, shard_bounds

pytestmark = pytest.mark.unit


def brute_force(Xq, Xb, k, exclude=None):
    """Exact float64 kNN, ties by position; ``exclude`` (nq, n) bool masks rows a query may not use. Queries go
    in chunks, so that the (queries, rows, d) differences stay small."""
    Xb = Xb.astype(np.float64)
    D = np.concatenate([np.sqrt(((Xq[i:i + 64, None, :].astype(np.float64) - Xb[None]) ** 2).sum(-1))
                        for i in range(0, len(Xq), 64)])
    if exclude is not None:
        D[exclude] = np.inf
    I = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, I, 1), I


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 64)).astype(np.float32), rng.normal(size=(300, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def tied():
    """Many exact duplicates and equidistant rows: 40 copies of one row, a lattice of small integers."""
    rng = np.random.default_rng(1)
    lattice = rng.integers(-2, 3, size=(600, 16)).astype(np.float32)  # many rows at equal distances
    Xb = np.concatenate([lattice, np.repeat(lattice[:1], 40, axis=0), lattice[100:160]])
    Xb = Xb[rng.permutation(len(Xb))]
    Xq = np.concatenate([Xb[:50], rng.integers(-2, 3, size=(50, 16)).astype(np.float32)])
    return Xb, Xq


def test_one_and_four_shards_agree_with_brute_force(data):
    Xb, Xq = data
    d1, i1 = build_index(Xb, n_shards=1).search(Xq, 5)
    d4, i4 = build_index(Xb, n_shards=4).search(Xq, 5)
    D, I = brute_force(Xq, Xb, 5)
    np.testing.assert_array_equal(i1, i4)
    np.testing.assert_array_equal(d1, d4)  # bit-identical, whatever the shard layout
    np.testing.assert_array_equal(i1, I)
    np.testing.assert_allclose(d1, D, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 45])
def test_ties_and_duplicates_are_exact_for_1_to_8_shards(tied, k):
    """Far more tied rows than the over-fetch margin: the answer is still brute force's (ties by position)."""
    Xb, Xq = tied
    D, I = brute_force(Xq, Xb, k)
    for n_shards in range(1, 9):
        d, i = build_index(Xb, n_shards=n_shards).search(Xq, k)
        np.testing.assert_array_equal(i, I, err_msg=f"{n_shards} shards")
        np.testing.assert_allclose(d, D, rtol=1e-12, atol=0)


def test_self_exclusion_never_returns_the_query_row(data):
    Xb, _ = data
    index = build_index(Xb, n_shards=3)
    d, i = index.search(Xb, 2, exclude=self_exclusions(np.arange(len(Xb))))
    assert not (i == np.arange(len(Xb))[:, None]).any()
    D, I = brute_force(Xb, Xb, 2, exclude=np.eye(len(Xb), dtype=bool))
    np.testing.assert_array_equal(i, I)


@pytest.mark.parametrize("n_shards", [1, 3, 8])
def test_duplicate_exclusion_matches_brute_force(tied, n_shards):
    Xb, _ = tied
    groups = duplicate_groups(Xb)
    rows = np.arange(0, len(Xb), 7)
    ex = self_exclusions(rows, groups)
    assert ex.max_rows >= 41  # the 40 added copies plus the lattice's own
    d, i = build_index(Xb, n_shards=n_shards).search(Xb[rows], 3, exclude=ex)
    D, I = brute_force(Xb[rows], Xb, 3, exclude=groups[rows][:, None] == groups[None, :])
    np.testing.assert_array_equal(i, I)
    np.testing.assert_allclose(d, D, rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def copies():
    """A few hundred distinct rows and three large groups of identical rows (blank frames, collapsed vectors)."""
    rng = np.random.default_rng(2)
    Xb = np.concatenate([rng.normal(size=(300, 8)), np.zeros((500, 8)), np.ones((200, 8)),
                         np.full((150, 8), 0.05)]).astype(np.float32)
    return Xb[rng.permutation(len(Xb))]


@pytest.mark.parametrize("n_shards", [1, 3])
def test_a_large_group_of_identical_rows_is_exact_for_every_exclusion(copies, n_shards):
    """Leave-one-out, duplicate exclusion, and labels that split a group of copies: all as brute force."""
    Xb = copies
    index = build_index(Xb, n_shards=n_shards)
    assert index.max_copies == (500 if n_shards == 1 else 170)  # copies are grouped within a shard
    rows = np.arange(len(Xb))
    d, i = index.search(Xb, 10, exclude=self_exclusions(rows))
    np.testing.assert_array_equal(i, brute_force(Xb, Xb, 10, exclude=np.eye(len(Xb), dtype=bool))[1])
    groups = duplicate_groups(Xb)
    d, i = index.search(Xb, 3, exclude=self_exclusions(rows, groups))
    D, I = brute_force(Xb, Xb, 3, exclude=groups[:, None] == groups[None, :])
    np.testing.assert_array_equal(i, I)
    np.testing.assert_allclose(d, D, rtol=1e-12, atol=0)
    owners = rows // 7  # rows of one image: a copy's first rows share the query's label, later ones do not
    ex = Exclusion(owners, owners, 7)
    d, i = index.search(Xb, 4, exclude=ex)
    np.testing.assert_array_equal(i, brute_force(Xb, Xb, 4, exclude=owners[:, None] == owners[None, :])[1])


def test_a_group_whose_first_copies_are_excluded_still_offers_its_later_ones():
    """Four identical rows, the first three under the query's label: the fourth, at distance 0, is its neighbour."""
    X = np.zeros((6, 2), np.float32)
    X[4], X[5] = [5, 5], [6, 6]
    d, i = build_index(X).search(np.zeros((1, 2), np.float32), 1, Exclusion(np.array([0]), np.array([0, 0, 0, 1, 2, 3]), 3))
    assert i.tolist() == [[3]] and d.tolist() == [[0.0]]


@pytest.mark.parametrize("seed", range(40))
def test_copies_under_random_labels_match_brute_force(seed):
    """Small sets full of copies, 1-3 shards, labels that split groups at random: brute force's answer."""
    rng = np.random.default_rng(seed)
    Xb = rng.integers(0, 3, size=(int(rng.integers(8, 40)), 2)).astype(np.float32)
    labels = rng.integers(0, 4, size=len(Xb))
    q = rng.integers(0, len(Xb), size=10)
    k = int(rng.integers(1, 4))
    ex = Exclusion(labels[q], labels, int(np.bincount(labels).max()))
    if k + ex.max_rows > len(Xb):
        return
    d, i = build_index(Xb, n_shards=int(rng.integers(1, 4))).search(Xb[q], k, exclude=ex)
    D, I = brute_force(Xb[q], Xb, k, exclude=labels[q][:, None] == labels[None, :])
    np.testing.assert_array_equal(i, I)
    np.testing.assert_allclose(d, D, rtol=1e-12, atol=0)


def test_identical_rows_are_searched_once():
    """20,000 copies of one vector among 2,000 others: each query fetches a handful of candidates, not the
    20,000 tied rows (memory measured by tracemalloc, which sees numpy's allocations)."""
    rng = np.random.default_rng(3)
    Xb = np.concatenate([np.zeros((20000, 64)), rng.normal(size=(2000, 64))]).astype(np.float32)
    index = build_index(Xb)
    tracemalloc.start()
    d, i = index.search(Xb[:5000], 10, exclude=self_exclusions(np.arange(5000)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(i[:2], [[1, *range(2, 11)], [0, *range(2, 11)]])
    assert (d == 0).all()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_rows_near_zero_settle_on_their_own_rounding_error():
    """4,000 distinct rows of norm ~1e-3 (a backbone's collapsed vectors) beside a few of norm 5: the float32
    rounding bound of each pair follows its own norms, so the small rows settle on a few candidates instead of
    all contending with each other (as they did under the largest norm's bound); still brute force's answer."""
    rng = np.random.default_rng(4)
    Xb = np.concatenate([rng.normal(scale=2e-4, size=(4000, 32)), rng.normal(size=(20, 32))]).astype(np.float32)
    Xb[-20:] *= 5 / np.linalg.norm(Xb[-20:], axis=1, keepdims=True)
    index = build_index(Xb, n_shards=2)
    tracemalloc.start()
    d, i = index.search(Xb, 10, exclude=self_exclusions(np.arange(len(Xb))))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    D, I = brute_force(Xb, Xb, 10, exclude=np.eye(len(Xb), dtype=bool))
    np.testing.assert_array_equal(i, I)
    np.testing.assert_allclose(d, D, rtol=1e-12, atol=0)
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_exclusions_are_vectorised_labels():
    ex = self_exclusions(np.array([3, 0]), np.array([0, 1, 0, 2]))
    np.testing.assert_array_equal(ex.query_labels, [2, 0])
    assert ex.max_rows == 2
    np.testing.assert_array_equal(ex.excluded(np.array([[3, 0, 2], [1, 2, 0]])),
                                  [[True, False, False], [False, True, True]])


@pytest.mark.parametrize("kind,min_recall", [("ivf", 0.8), ("hnsw", 0.9), ("sq8", 0.95), ("ivfpq", 0.5)])
def test_approximate_indexes_recall(data, kind, min_recall):
    Xb, Xq = data
    D, I = brute_force(Xq, Xb, 2)
    index = build_index(Xb, n_shards=2, kind=kind)
    assert index.kind == kind
    d, i = index.search(Xq, 2)
    recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(i, I)])
    assert recall >= min_recall
    found = i == I  # neighbours it found are re-ranked exactly
    np.testing.assert_allclose(d[found], D[found], rtol=1e-12)


def test_compressed_index_without_exactness_scores_from_codes(data):
    Xb, Xq = data
    shards = [build_shard(Xb[a:b], a, "sq8") for a, b in shard_bounds(len(Xb), 2)]
    d, i = ShardedIndex(shards, exact=False).search(Xq, 2)
    D, I = brute_force(Xq, Xb, 2)
    assert np.mean(i == I) > 0.9
    np.testing.assert_allclose(d, D, rtol=0.05)  # code distances, not exact


def test_memory_mapped_vectors_give_the_same_answer(data, tmp_path):
    Xb, Xq = data
    shards = []
    for a, b in shard_bounds(len(Xb), 3):
        s = build_shard(Xb[a:b], a, "ivfpq")
        np.save(tmp_path / f"{a}.npy", s.vectors)
        shards.append(type(s)(a, np.load(tmp_path / f"{a}.npy", mmap_mode="r"), s.faiss_bytes))
    in_memory = build_index(Xb, 3, "ivfpq").search(Xq, 2)
    mapped = ShardedIndex(shards).search(Xq, 2)
    np.testing.assert_array_equal(in_memory[1], mapped[1])
    np.testing.assert_array_equal(in_memory[0], mapped[0])


def test_k_larger_than_reference_set_is_an_error(data):
    Xb, Xq = data
    with pytest.raises(ValueError, match="needs at least"):
        build_index(Xb[:3]).search(Xq, 4)


def test_nan_embeddings_are_rejected():
    X = np.ones((4, 3), dtype=np.float32)
    X[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(X)


def test_a_memory_mapped_shard_pickles_as_its_path(data, tmp_path):
    import pickle

    from dnnad.core.index import mapped_shard

    Xb, _ = data
    np.save(tmp_path / "s.npy", Xb)
    s = mapped_shard(0, str(tmp_path / "s.npy"))
    blob = pickle.dumps(s)
    assert len(blob) < Xb.nbytes / 100
    back = pickle.loads(blob)
    assert isinstance(back.vectors, np.memmap)
    np.testing.assert_array_equal(back.vectors, Xb)


def test_a_memory_mapped_shard_by_value_pickles_its_rows(data, tmp_path):
    """For a process on another host, which cannot open the file."""
    import pickle

    from dnnad.core.index import mapped_shard

    Xb, _ = data
    np.save(tmp_path / "s.npy", Xb)
    s = mapped_shard(0, str(tmp_path / "s.npy")).by_value()
    back = pickle.loads(pickle.dumps(s))
    assert not isinstance(back.vectors, np.memmap) and back.memory_bytes == Xb.nbytes
    np.testing.assert_array_equal(back.vectors, Xb)


class CountingIndex(ShardedIndex):
    """Counts the reference rows the exact re-rank reads."""

    rows_read = 0

    def vectors(self, idx):
        self.rows_read += len(idx)
        return super().vectors(idx)


def test_compressed_rerank_reads_the_breadth_of_an_unexcluded_query(data):
    """Excluding 400 rows per query over-fetches ~3,200 codes per shard, but only the best
    (k + margin) x 8 x shards valid ones are re-ranked: leave-one-image-out patch banks stay in memory."""
    Xb, Xq = data
    groups = np.arange(len(Xb)) // 400  # each query excludes one group of 400 rows
    rows = np.arange(0, len(Xb), 10)
    ex = self_exclusions(rows, groups)
    shards = [build_shard(Xb[a:b], a, "sq8") for a, b in shard_bounds(len(Xb), 2)]
    index = CountingIndex(shards)
    d, i = index.search(Xb[rows], 2, exclude=ex)
    D, I = brute_force(Xb[rows], Xb, 2, exclude=groups[rows][:, None] == groups[None, :])
    assert index.rows_read <= len(rows) * (2 + 3) * 8 * 2
    assert (groups[i] != groups[rows][:, None]).all()  # no query used a row of its own group
    assert np.mean(i == I) >= 0.95
    np.testing.assert_allclose(d[i == I], D[i == I], rtol=1e-12)
