"""One fit routine: the library (in-process backend) and the job (Ray backend) give the same threshold,
calibration scores and reference ids in every fit mode."""
from dataclasses import replace

import numpy as np
import pytest

from dnnad import DN2
from dnnad.config import ScoreConfig
from dnnad.core.dn2 import FitParams, LocalBackend, fit_reference
from dnnad.stages.fit import RayBackend
from tests.helpers import planted


def data_with_duplicates():
    X, _ = planted(n_normal=300, n_anom=10, d=8, seed=4)
    return np.vstack([X, X[:6]]), np.array([f"row-{i:04d}" for i in range(len(X) + 6)], dtype=object)


@pytest.mark.ray
@pytest.mark.parametrize("params", [
    FitParams(k=2), FitParams(k=3, n_shards=3), FitParams(k=2, reduce=25), FitParams(k=2, exclude_duplicates=True),
    FitParams(k=2, index="hnsw", n_shards=2), FitParams(k=2, contamination=0.05),
], ids=["plain", "3-shards", "kmeans", "exclude-duplicates", "hnsw", "contamination"])
def test_library_and_ray_backend_fit_identically(ray_local, params):
    X, ids = data_with_duplicates()
    local = fit_reference(X, ids, params, LocalBackend())
    remote = fit_reference(X, ids, params, RayBackend(ScoreConfig(batch_size=64)))
    assert local.threshold == remote.threshold and local.k == remote.k
    np.testing.assert_array_equal(local.calibration_scores, remote.calibration_scores)
    np.testing.assert_array_equal(local.calibration_pos, remote.calibration_pos)
    assert local.ids.tolist() == remote.ids.tolist() and local.reduction == remote.reduction
    est = DN2(k=params.k, n_shards=params.n_shards, index=params.index, reduce=params.reduce,
              exclude_duplicates=params.exclude_duplicates, contamination=params.contamination).fit(X, ids=ids)
    assert est.threshold_ == remote.threshold
    np.testing.assert_array_equal(est.loo_scores_, remote.calibration_scores)


@pytest.mark.ray
@pytest.mark.parametrize("params, groups", [
    (FitParams(k=3, n_shards=3), 3), (FitParams(k=2, n_shards=4, exclude_duplicates=True), 2),
    (FitParams(k=2, n_shards=5, index="sq8"), 2),
], ids=["3-shards-3-groups", "exclude-duplicates-2-groups", "sq8-2-groups"])
def test_shard_groups_on_separate_actor_pools_fit_identically(ray_local, params, groups):
    """No actor holds the whole index, yet calibration scores and neighbours equal the in-process fit's."""
    X, ids = data_with_duplicates()
    local = fit_reference(X, ids, params, LocalBackend())
    remote = fit_reference(X, ids, params, RayBackend(ScoreConfig(batch_size=64, shard_groups=groups)))
    assert local.threshold == remote.threshold
    np.testing.assert_array_equal(local.calibration_scores, remote.calibration_scores)
    np.testing.assert_array_equal(local.calibration_pos, remote.calibration_pos)


@pytest.mark.unit
def test_reduced_fit_calibrates_normal_rows_against_the_centroids():
    X, ids = data_with_duplicates()
    fit = fit_reference(X, ids, FitParams(k=2, reduce=25))
    assert len(fit.ids) == 25 and len(fit.calibration_scores) == len(X) and fit.n_normal == len(X)
    d = np.sqrt(((X[:, None, :].astype(np.float64) - fit.reference[None].astype(np.float64)) ** 2).sum(-1))
    np.testing.assert_allclose(fit.calibration_scores, np.sort(d, axis=1)[:, :2].mean(1), rtol=1e-6)


@pytest.mark.ray
def test_labels_ranked_in_packed_tasks_equal_labels_fitted_on_the_actors(ray_local):
    """The per-label ranking's two routes (small labels packed into tasks; large ones on the sharded index and
    scoring actors) find the same neighbours: labels of 1, 2, 3 and 40-70 rows, integer and string names,
    unlabelled rows."""
    from dnnad.config import JobConfig, ScoreConfig, SourceConfig
    from dnnad.stages.collect import Embedded
    from dnnad.stages.fit import fit_per_label

    X, ids = data_with_duplicates()
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 1, "two", "3", None, 5], dtype=object), len(X), p=[.2, .25, .2, .15, .1, .1])
    labels[:6] = ["solo", "pair", "pair", "trio", "trio", "trio"]
    data = Embedded(ids, X, {"label": labels}, None)
    cfg = JobConfig("rank", "out", normal=SourceConfig("n"), score=ScoreConfig(batch_size=64))
    packed = fit_per_label(data, labels, cfg)  # every label is small
    on_actors = fit_per_label(data, labels, cfg, small_rows=2)  # labels of three rows or more on the actors
    np.testing.assert_array_equal(packed[0], on_actors[0])
    assert packed[1].tolist() == on_actors[1].tolist()
    np.testing.assert_array_equal(packed[2], on_actors[2])
    copies = Embedded(ids[:3], np.repeat(X[:1], 3, axis=0), {}, None)  # one label, three copies of one image
    excluding = replace(cfg, score=replace(cfg.score, exclude_duplicates=True))
    for small_rows in (100, 2):  # in a task; on the actors
        assert np.isnan(fit_per_label(copies, np.array(["c"] * 3, dtype=object), excluding, small_rows)[0]).all()
    assert np.isnan(packed[0][0]) and packed[1][1].tolist() == [ids[2], None]  # alone; one neighbour in a pair
    unlabelled = np.array([v is None for v in labels])
    assert np.isnan(packed[0][unlabelled]).all() and not np.isnan(packed[0][~unlabelled][1:]).any()
    for row in np.flatnonzero(~unlabelled)[1:]:  # neighbours come from the row's own label
        mine = {str(labels[p]) for p in np.flatnonzero(np.isin(ids, [i for i in packed[1][row] if i is not None]))}
        assert mine == {str(labels[row])}


@pytest.mark.ray
def test_the_fingerprint_search_on_the_actors_equals_the_local_one(ray_local):
    """The rank job's second duplicate search (``fingerprint_neighbours``) over a set beyond the driver's share
    runs on the sharded index and scoring actors: the same neighbours as in-process, flat prints skipped."""
    from dnnad.core.duplicates import fingerprint_neighbours

    F = np.random.default_rng(3).integers(0, 256, (400, 32 * 32)).astype(np.uint8)
    F[:40] = F[40:80]  # copies: tied descriptors, settled by position
    F[100] = 77  # a flat print
    local = fingerprint_neighbours(F, 6)
    np.testing.assert_array_equal(fingerprint_neighbours(F, 6, RayBackend(ScoreConfig()), n_shards=3), local)
    assert (local[100] == -1).all() and not (local == 100).any()
    assert (local[:40, 0] == np.arange(40, 80)).all()
