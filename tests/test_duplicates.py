"""Near-duplicate groups: candidate pairs from a kNN search → threshold on unit vectors → components."""
import numpy as np
import pytest

from dnnad.core.arrays import l2_normalize
from dnnad.core.dn2 import FitParams, fit_reference
from dnnad.core.duplicates import EXTRA_NEIGHBOURS, candidate_pairs, find_duplicates

pytestmark = pytest.mark.unit


def cloud(n: int = 60, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def neighbours(X: np.ndarray, exclude_duplicates: bool = False) -> np.ndarray:
    fit = fit_reference(X, None, FitParams(k=2, extra_neighbours=EXTRA_NEIGHBOURS,
                                           exclude_duplicates=exclude_duplicates))
    return fit.neighbour_pos


def test_no_duplicates_no_groups():
    X = cloud()
    g = find_duplicates(X, neighbours(X), 0.05)
    assert g.n_groups == 0 and (g.group == -1).all() and np.isnan(g.distance).all()
    assert len(g.members) == 0 and len(g.redundant) == 0


def test_planted_copies_form_groups_numbered_by_first_member():
    rng = np.random.default_rng(1)
    X = cloud()
    X[40] = X[3] * 3.0  # same direction, other scale: distance 0 once normalised
    X[41] = X[3] + rng.normal(scale=0.01, size=8)  # a near copy of 3
    X[42] = X[41] + rng.normal(scale=0.01, size=8)  # chained to 3 through 41
    X[50] = X[10] + rng.normal(scale=0.01, size=8)
    g = find_duplicates(X, neighbours(X), 0.05)
    assert g.n_groups == 2
    assert g.first.tolist() == [3, 10] and g.size.tolist() == [4, 2]
    assert g.members.tolist() == [3, 40, 41, 42, 10, 50]
    assert g.redundant.tolist() == [40, 41, 42, 50]
    assert g.distance[3] == 0.0 and g.distance[40] == pytest.approx(0.0, abs=1e-6)
    Xn = l2_normalize(X, np.float64)
    assert g.distance[42] == pytest.approx(np.linalg.norm(Xn[42] - Xn[3]))
    assert (g.group[[3, 40, 41, 42]] == 0).all() and (g.group[[10, 50]] == 1).all()
    assert (g.group[np.setdiff1d(np.arange(60), [3, 40, 41, 42, 10, 50])] == -1).all()


def test_threshold_decides_and_is_inclusive():
    X = cloud()
    X[20] = X[7] + 0.05
    d = float(np.linalg.norm(l2_normalize(X, np.float64)[20] - l2_normalize(X, np.float64)[7]))
    assert find_duplicates(X, neighbours(X), d).n_groups == 1
    assert find_duplicates(X, neighbours(X), d * 0.99).n_groups == 0


def test_same_labels_always_group_even_if_the_search_skips_them():
    X = cloud()
    X[30] = X[2]
    X[31] = X[2]
    nb = neighbours(X, exclude_duplicates=True)  # identical vectors are not each other's neighbours
    assert find_duplicates(X, nb, 0.0).n_groups == 0
    hashes = np.array([b"h%d" % i for i in range(60)], dtype="S8")
    hashes[[30, 31]] = hashes[2]
    g = find_duplicates(X, nb, 0.0, [hashes])
    assert g.n_groups == 1 and g.members.tolist() == [2, 30, 31] and g.size.tolist() == [3]


def test_candidate_pairs_drop_missing_and_self():
    a, b = candidate_pairs(np.array([[1, -1], [0, 1], [-1, -1]]))
    assert a.tolist() == [0, 1] and b.tolist() == [1, 0]


def test_extra_neighbours_leave_scores_and_calibration_unchanged():
    X = cloud(200, 16, seed=3)
    plain = fit_reference(X, None, FitParams(k=2))
    more = fit_reference(X, None, FitParams(k=2, extra_neighbours=EXTRA_NEIGHBOURS))
    assert np.array_equal(plain.calibration_scores, more.calibration_scores)
    assert np.array_equal(plain.calibration_pos, more.calibration_pos) and plain.threshold == more.threshold
    assert more.neighbour_pos.shape == (200, 2 + EXTRA_NEIGHBOURS)
    assert np.array_equal(more.neighbour_pos[:, :2], more.calibration_pos)
    tiny = fit_reference(X[:4], None, FitParams(k=2, extra_neighbours=EXTRA_NEIGHBOURS))
    assert tiny.neighbour_pos.shape == (4, 3)  # clamped: each of 4 rows has 3 others


def rank_cfg(*flags):
    from dnnad.cli import config_from_args, parser

    return config_from_args(parser().parse_args(["rank", "--data", "d", "--out", "o", *flags]))


def test_duplicate_flags():
    from dnnad.config import DUPLICATE_THRESHOLD, ConfigError

    r = rank_cfg().rank
    assert r.duplicates and r.duplicate_threshold == DUPLICATE_THRESHOLD and not r.drop_duplicates
    r = rank_cfg("--no-duplicates").rank
    assert not r.duplicates
    assert rank_cfg("--duplicate-threshold", "0.4", "--drop-duplicates").rank.drop_duplicates
    for flags, msg in ((["--duplicate-threshold", "2.5"], "in \\[0, 2\\]"),
                       (["--no-duplicates", "--drop-duplicates"], "needs the duplicate groups"),
                       (["--drop-duplicates", "--reduce", "kmeans:4"], "--reduce")):
        with pytest.raises(ConfigError, match=msg):
            rank_cfg(*flags).validate()
