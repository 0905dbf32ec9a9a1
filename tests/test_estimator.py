"""The scikit-learn style API: DN2(k).fit(X).anomaly_score(X), few-shot, ranking, reduction."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.estimator_checks import check_estimator

from dnnad import DN2, rank_outliers
from tests.helpers import planted

pytestmark = pytest.mark.unit


def test_scores_are_mean_euclidean_distance_to_k_nearest():
    rng = np.random.default_rng(1)
    Xn, Xq = rng.normal(size=(500, 8)), rng.normal(size=(50, 8))
    model = DN2(k=2, n_shards=3).fit(Xn)
    dist, _ = NearestNeighbors(n_neighbors=2).fit(Xn).kneighbors(Xq)
    np.testing.assert_allclose(model.anomaly_score(Xq), dist.mean(1), rtol=1e-5)
    assert model.k_ == 2 and model.n_normal_ == 500


def test_threshold_is_the_quantile_of_leave_one_out_scores():
    rng = np.random.default_rng(2)
    Xn = rng.normal(size=(1000, 8))
    model = DN2(k=2, quantile=0.95).fit(Xn)
    dist, _ = NearestNeighbors(n_neighbors=3).fit(Xn).kneighbors(Xn)  # first neighbour is itself
    np.testing.assert_allclose(model.loo_scores_, dist[:, 1:].mean(1), rtol=1e-5)
    assert abs((model.loo_scores_ > model.threshold_).mean() - 0.05) < 0.01
    fresh = rng.normal(size=(4000, 8))  # new normal data is flagged at about the chosen rate
    assert abs((model.predict(fresh) == -1).mean() - 0.05) < 0.025
    by_rate = DN2(k=2, contamination=0.1).fit(Xn)
    assert abs((by_rate.loo_scores_ > by_rate.threshold_).mean() - 0.1) < 0.01


def test_few_shot_clamps_k_with_a_warning():
    X = np.array([[0.0, 0.0], [1.0, 0.0]])
    with pytest.warns(UserWarning, match="using k=1"):
        model = DN2(k=2).fit(X)
    assert model.k_ == 1 and not model.threshold_reliable_
    assert model.anomaly_score(np.array([[10.0, 0.0]]))[0] == pytest.approx(9.0)
    with pytest.raises(ValueError, match="at least 2"):
        DN2().fit(X[:1])


def test_ranking_puts_planted_anomalies_on_top():
    X, y = planted()
    scores = rank_outliers(X, k=2)
    top = np.argsort(-scores)[: int(y.sum())]
    assert y[top].mean() >= 0.95  # precision at the injected count
    assert roc_auc_score(y, scores) > 0.99


def test_exact_duplicates_are_neighbours_unless_excluded():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 4)).astype(np.float32)
    X = np.vstack([X, X[:5]])  # five exact duplicates
    with_dups = DN2(k=1).fit(X)
    assert (with_dups.loo_scores_[:5] == 0).all()
    without = DN2(k=1, exclude_duplicates=True).fit(X)
    assert (without.loo_scores_ > 0).all()


def test_kmeans_reduction_keeps_accuracy_on_planted_data():
    X, y = planted(n_normal=2000, n_anom=0)
    Xq, yq = planted(n_normal=200, n_anom=20, seed=5)
    full = DN2(k=2).fit(X)
    reduced = DN2(k=2, reduce=200).fit(X)
    assert len(reduced.ids_) == 200 and reduced.n_normal_ == 2000
    assert roc_auc_score(yq, reduced.anomaly_score(Xq)) > 0.99
    assert roc_auc_score(yq, full.anomaly_score(Xq)) > 0.99


def test_scikit_learn_outlier_contract_novelty_and_outlier_modes():
    """scikit-learn's orientation: score_samples higher for normal rows, predict -1 outlier / +1 inlier;
    anomaly_score is the DN2 score the jobs write (higher = more anomalous)."""
    X, y = planted()
    normal, test, y_test = X[y == 0][:300], X, y
    model = DN2().fit(normal)
    s = model.anomaly_score(test)
    np.testing.assert_allclose(model.score_samples(test), -s)
    np.testing.assert_allclose(model.decision_function(test), model.threshold_ - s)
    assert model.offset_ == -model.threshold_
    np.testing.assert_array_equal(model.predict(test), np.where(s > model.threshold_, -1, 1))
    assert roc_auc_score(y_test, model.anomaly_score(test)) > 0.99 and roc_auc_score(y_test, model.score_samples(test)) < 0.01
    assert not hasattr(model, "fit_predict")  # a fitted row scored as a new one finds itself at distance 0
    unsupervised = DN2(novelty=False, contamination=0.05)
    labels = unsupervised.fit_predict(X)
    np.testing.assert_array_equal(labels, np.where(rank_outliers(X) > unsupervised.threshold_, -1, 1))
    flagged = set(np.flatnonzero(labels == -1))
    assert len(flagged) >= 19 and flagged <= set(np.flatnonzero(y == 1))  # 5 % of 400 rows, all planted ones
    assert not hasattr(unsupervised, "predict")


def test_scikit_learn_estimator_checks_pass():
    """scikit-learn's own checks: every one passes in the unsupervised mode (novelty=False); in the default
    novelty mode every one but check_outliers_train, which predicts the fitted rows as new ones and asks
    that some be outliers: each finds itself at distance 0 (LocalOutlierFactor(novelty=True) is exempt the
    same way: scikit-learn checks it only with novelty=False)."""
    for est, allowed in ((DN2(novelty=False), set()), (DN2(), {"check_outliers_train"})):
        results = check_estimator(est, on_fail=None)
        failed = {r["check_name"] for r in results if r["status"] == "failed"}
        assert len(results) >= 44 and failed == allowed, (est, failed)


def test_parameters_are_validated_with_one_line_errors():
    X = np.random.default_rng(0).normal(size=(20, 4))
    for bad in (dict(k=0), dict(contamination=0.7), dict(index="lsh"), dict(normalize="l1"), dict(pca=0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))!r} parameter of DN2"):
            DN2(**bad).fit(X)
    with pytest.raises(ValueError, match="n_samples = 1"):
        DN2().fit(X[:1])
    with pytest.raises(ValueError, match="X has 3 features, but DN2 is expecting 4"):
        DN2().fit(X).predict(X[:, :3])
