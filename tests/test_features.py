"""Feature options: L2 normalisation and Ledoit-Wolf whitening (core), multi-layer pools, flip TTA and full
resize (vision), their place in the model format and in the flags a saved model decides."""
import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from dnnad import DN2, rank_outliers
from dnnad.cli import config_from_args, explicit_settings, parser
from dnnad.config import ConfigError
from dnnad.core.arrays import l2_normalize
from dnnad.core.dn2 import FitParams, fit_reference
from dnnad.core.features import FeatureTransform, fit_transform
from dnnad.core.index import build_shard
from dnnad.core.model import ModelError, load_model, model_from_fit, save_model
from dnnad.jobs.model_settings import apply_model
from dnnad.vision.backbones import FeatureExtractor, embed_from_taps, preprocess_fn
from dnnad.vision.specs import get_spec
from dnnad.vision.weights import resolve_weights
from tests.helpers import planted


def correlated(n=4000, d=6, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    return (rng.normal(size=(n, d)) @ A + rng.normal(size=d) * 5).astype(np.float32)


@pytest.mark.unit
def test_whitened_normal_vectors_have_identity_covariance_and_mahalanobis_distances():
    X = correlated()
    t = fit_transform(X, whiten=True)
    Z = t.transform(X).astype(np.float64)
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(Z, rowvar=False, bias=True), np.eye(X.shape[1]), atol=0.05)  # shrunk: ~I
    S = LedoitWolf().fit(X.astype(np.float64)).covariance_
    diff = X[:50].astype(np.float64) - X[50:100]
    mahalanobis = np.sqrt(np.einsum("nd,de,ne->n", diff, np.linalg.inv(S), diff))
    np.testing.assert_allclose(np.linalg.norm(Z[:50] - Z[50:100], axis=1), mahalanobis, rtol=1e-4)
    assert 0.0 <= t.shrinkage <= 1.0


@pytest.mark.unit
def test_whitening_survives_fewer_rows_than_dimensions_and_identical_rows():
    rng = np.random.default_rng(1)
    X, Q = rng.normal(size=(5, 64)), rng.normal(size=(3, 64))
    Z = fit_transform(X, whiten=True).transform(Q).astype(np.float64)
    lw = LedoitWolf().fit(X)  # the thin-SVD whitener is scikit-learn's Ledoit-Wolf covariance, rank-deficient or not
    np.testing.assert_allclose(np.linalg.norm(Z[0] - Z[1]) ** 2, (Q[0] - Q[1]) @ lw.precision_ @ (Q[0] - Q[1]),
                               rtol=1e-4)
    same = np.ones((4, 8), np.float32)
    assert np.isfinite(fit_transform(same, whiten=True).transform(same)).all()


@pytest.mark.unit
def test_l2_rows_have_unit_norm_and_plain_is_the_identity():
    X = correlated(n=100)
    np.testing.assert_allclose(np.linalg.norm(fit_transform(X, "l2").transform(X), axis=1), 1, rtol=1e-6)
    assert FeatureTransform().is_identity
    np.testing.assert_array_equal(fit_transform(X).transform(X), X)
    with pytest.raises(ValueError, match="normalize"):
        fit_transform(X, "l1")


@pytest.mark.unit
@pytest.mark.parametrize("normalize, whiten", [(None, False), ("l2", False), (None, True), ("l2", True)])
def test_estimator_equals_plain_dn2_on_transformed_vectors(normalize, whiten):
    X, _ = planted(n_normal=300, n_anom=0, d=12)
    Q, yq = planted(n_normal=100, n_anom=10, d=12, seed=3)
    model = DN2(k=2, normalize=normalize, whiten=whiten).fit(X)
    t = fit_transform(X, normalize, whiten)
    dist, _ = NearestNeighbors(n_neighbors=2).fit(t.transform(X)).kneighbors(t.transform(Q))
    np.testing.assert_allclose(model.anomaly_score(Q), dist.mean(1), rtol=1e-5)
    plain = DN2(k=2).fit(t.transform(X))
    np.testing.assert_array_equal(model.loo_scores_, plain.loo_scores_)
    assert model.threshold_ == plain.threshold_
    np.testing.assert_array_equal(rank_outliers(X, normalize=normalize, whiten=whiten), model.loo_scores_)
    if not (normalize or whiten):  # no options: exactly the DN2 of before
        dist, _ = NearestNeighbors(n_neighbors=2).fit(X).kneighbors(Q)
        np.testing.assert_allclose(model.anomaly_score(Q), dist.mean(1), rtol=1e-5)


@pytest.mark.unit
def test_whitening_helps_where_the_normal_set_is_anisotropic():
    """A thin normal cloud: Euclidean kNN misses anomalies off its axis; Mahalanobis kNN sees them."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(500, 2)) * [10.0, 0.1]
    Q = np.vstack([rng.normal(size=(200, 2)) * [10.0, 0.1], rng.normal(size=(20, 2)) * [1.0, 0.1] + [0, 0.6]])
    y = np.r_[np.zeros(200), np.ones(20)]
    from sklearn.metrics import roc_auc_score

    whitened = roc_auc_score(y, DN2(whiten=True).fit(X).anomaly_score(Q))
    assert whitened > 0.99 and whitened > roc_auc_score(y, DN2().fit(X).anomaly_score(Q))


def fitted(params, **embedding):
    X, _ = planted(n_normal=120, n_anom=5, d=8)
    fit = fit_reference(X, None, params)
    return X, model_from_fit(fit, [build_shard(fit.reference, 0)], params, backbone="resnet18", image_size=32,
                             weights="none", **embedding)


@pytest.mark.unit
def test_model_with_feature_options_round_trips_and_is_format_version_3(tmp_path):
    X, m = fitted(FitParams(k=2, normalize="l2", whiten=True), layers=["layer3", "final"], tta="flip",
                  resize="full")
    save_model(m, str(tmp_path / "m"))
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["version"] == 3 and doc["meta"]["whiten"] and doc["meta"]["normalize"] == "l2"
    back = load_model(str(tmp_path / "m"))
    assert back.meta == m.meta and back.meta.layers == ["layer3", "final"]
    np.testing.assert_array_equal(back.transform.whitener, m.transform.whitener)
    np.testing.assert_array_equal(back.transform.transform(X), m.transform.transform(X))
    _, plain = fitted(FitParams(k=2))
    save_model(plain, str(tmp_path / "plain"))
    assert json.loads((tmp_path / "plain" / "model.json").read_text())["version"] == 2  # older dnnad reads it
    assert load_model(str(tmp_path / "plain")).transform.is_identity


@pytest.mark.unit
def test_damaged_whitening_arrays_are_refused(tmp_path):
    _, m = fitted(FitParams(k=2, whiten=True))
    save_model(m, str(tmp_path / "m"))
    np.save(tmp_path / "m" / "transform-whitener.npy", np.eye(3))
    with pytest.raises(ModelError, match="damaged model.*transform arrays"):
        load_model(str(tmp_path / "m"))


@pytest.mark.unit
def test_a_saved_model_decides_the_feature_flags():
    _, m = fitted(FitParams(k=2, normalize="l2", whiten=True), layers=["layer3", "final"], tta="flip",
                  resize="full")
    ap = parser()

    def cfg(*extra):
        argv = ["score", "--query", "q", "--out", "o", *extra]
        a = ap.parse_args(argv)
        c = config_from_args(a, explicit_settings(ap, a, argv))
        return apply_model(c, m, frozenset(c.explicit))

    c = cfg()
    assert (c.embed.layers, c.embed.tta, c.embed.resize) == (("layer3", "final"), "flip", "full")
    assert (c.features.normalize, c.features.whiten) == ("l2", True)
    assert cfg("--whiten", "--layers", "layer3,final", "--normalize", "l2").features.whiten
    with pytest.raises(ConfigError, match="--layers conflicts with the saved model"):
        cfg("--layers", "layer4")
    _, m = fitted(FitParams(k=2))  # a plain model refuses every feature option, the default l2 given too
    assert cfg().features.normalize is None and cfg("--normalize", "none").features.normalize is None
    for flags in (["--whiten"], ["--normalize", "l2"], ["--tta", "flip"], ["--resize", "full"], ["--layers", "final"]):
        with pytest.raises(ConfigError, match=f"{flags[0]} conflicts with the saved model"):
            cfg(*flags)


@pytest.fixture(scope="module")
def r18():
    spec = get_spec("resnet18", 32)
    return resolve_weights(spec, "none").state_dict


@pytest.mark.unit
def test_layers_are_l2_normalised_pools_concatenated_and_flip_averages_views(r18):
    x = torch.randn(3, 3, 32, 32)
    plain = FeatureExtractor(get_spec("resnet18", 32), r18, device="cpu")
    multi = FeatureExtractor(get_spec("resnet18", 32, layers=("layer2", "layer3", "final")), r18, device="cpu")
    taps = multi.taps(x)
    assert {n: v.shape[1] for n, v in taps.items()} == {"layer2": 128, "layer3": 256, "final": 512}
    np.testing.assert_allclose(taps["final"], plain(x), rtol=1e-5, atol=1e-6)
    e = multi(x)
    assert e.shape == (3, 128 + 256 + 512)
    for a, b in ((0, 128), (128, 384), (384, 896)):
        np.testing.assert_allclose(np.linalg.norm(e[:, a:b], axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(e[:, 384:], l2_normalize(plain(x)), rtol=1e-4, atol=1e-6)
    flip = FeatureExtractor(get_spec("resnet18", 32, tta="flip"), r18, device="cpu")
    np.testing.assert_allclose(flip(x), (plain(x) + plain(torch.flip(x, dims=[3]))) / 2, rtol=1e-4, atol=1e-6)
    symmetric = (x + torch.flip(x, dims=[3])) / 2
    np.testing.assert_allclose(flip(symmetric), plain(symmetric), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(embed_from_taps([taps], ()), taps["final"])


@pytest.mark.unit
def test_unknown_layer_and_onnx_layers_are_refused(r18):
    with pytest.raises(ValueError, match="has no module 'blocks.9'.*layer4"):
        FeatureExtractor(get_spec("resnet18", 32, layers=("blocks.9",)), r18, device="cpu")
    with pytest.raises(ValueError, match="ONNX"):
        get_spec("onnx:m.onnx", layers=("final",))
    with pytest.raises(ValueError, match="--tta"):
        get_spec("resnet18", tta="rotate")


@pytest.mark.unit
def test_full_resize_keeps_the_whole_image():
    img = Image.new("RGB", (40, 40), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 40, 3))  # a black border row that centre cropping cuts off
    crop = preprocess_fn(get_spec("resnet18", 32))(img)
    full = preprocess_fn(get_spec("resnet18", 32, resize="full"))(img)
    assert crop.shape == full.shape == (3, 32, 32)
    assert full[:, 0].mean() < crop[:, 0].mean() - 1.0  # the border survives only the full resize
    assert get_spec("resnet18", resize="full").feature_tag == "full" and get_spec("resnet18").feature_tag == ""


@pytest.mark.ray
def test_feature_options_round_trip_through_a_saved_model_and_match_the_library(ray_local, corpus, tmp_path):
    from dnnad.cli import main
    from dnnad.stages.embed import Embedder
    from tests.helpers import FAST, read_scores

    options = ["--normalize", "l2", "--whiten", "--layers", "layer3,final", "--tta", "flip", "--resize", "full"]
    normal, query, model = str(corpus.normal), str(corpus.query), str(tmp_path / "model")
    assert main(["score", "--normal", normal, "--query", query, "--out", str(tmp_path / "fit"), "--model", model,
                 *options, *FAST]) == 0
    assert main(["score", "--query", query, "--out", str(tmp_path / "reuse"), "--model", model, *FAST]) == 0
    fit, reuse = read_scores(tmp_path / "fit"), read_scores(tmp_path / "reuse")
    assert fit["id"].to_pylist() == reuse["id"].to_pylist()
    assert fit["score"].to_pylist() == reuse["score"].to_pylist()  # identical, not just close
    assert fit["neighbor_ids"].to_pylist() == reuse["neighbor_ids"].to_pylist()
    record = json.loads((tmp_path / "reuse" / "run.json").read_text())
    assert record["config"]["features"] == {"normalize": "l2", "whiten": True, "pca": None}
    assert record["config"]["embed"]["layers"] == ["layer3", "final"] and record["config"]["embed"]["tta"] == "flip"
    assert record["model"]["whiten"] and record["model"]["resize"] == "full"

    spec = get_spec("resnet18", 32, layers=("layer3", "final"), tta="flip", resize="full")
    emb = Embedder(spec, resolve_weights(spec, "none").state_dict, device="cpu")

    def embed(root, ids):
        out = emb({"id": np.array(ids, dtype=object), "path": np.array([str(root / i) for i in ids], dtype=object)})
        return np.stack(out["embedding"].to_numpy(zero_copy_only=False))

    normal_ids = sorted(p.name for p in corpus.normal.iterdir())
    lib = DN2(k=2, normalize="l2", whiten=True).fit(embed(corpus.normal, normal_ids))
    ok = fit.filter(pc.equal(fit["status"], "ok"))
    expected = lib.anomaly_score(embed(corpus.query, ok["id"].to_pylist()))
    np.testing.assert_allclose(ok["score"].to_numpy(), expected, rtol=1e-4)
    assert load_model(model).threshold == pytest.approx(lib.threshold_, rel=1e-4)


@pytest.mark.unit
def test_pca_keeps_the_normal_sets_leading_components():
    """``pca=D``: distances after the transform are those between scikit-learn PCA projections (signs aside),
    the index holds D dimensions, and with whitening the covariance is fitted in those D dimensions."""
    from sklearn.decomposition import PCA

    X, Q = correlated(n=600, d=10, seed=1), correlated(n=50, d=10, seed=2)
    t = fit_transform(X, pca=4)
    assert t.transform(Q).shape == (50, 4) and t.dim == 4 and not t.whiten
    ref = PCA(n_components=4).fit(X.astype(np.float64))
    d_ours = np.linalg.norm(t.transform(Q)[:, None] - t.transform(X[:30])[None], axis=2)
    d_sk = np.linalg.norm(ref.transform(Q)[:, None] - ref.transform(X[:30])[None], axis=2)
    np.testing.assert_allclose(d_ours, d_sk, rtol=1e-4, atol=1e-4)
    both = fit_transform(X, pca=4, whiten=True)
    P = ref.transform(X)
    lw = LedoitWolf().fit(P)
    w, v = np.linalg.eigh(lw.covariance_)
    zca = (v / np.sqrt(w)) @ v.T
    expected = (ref.transform(Q) - P.mean(0)) @ zca
    d_both = np.linalg.norm(both.transform(Q)[:, None] - both.transform(Q)[None], axis=2)
    np.testing.assert_allclose(d_both, np.linalg.norm(expected[:, None] - expected[None], axis=2), rtol=1e-3)
    with pytest.raises(ValueError, match="pca=11"):
        fit_transform(X, pca=11)


@pytest.mark.unit
def test_estimator_with_pca_scores_brute_force_in_the_projected_space():
    X, _ = planted(n_normal=300, n_anom=0, d=12)
    Q, _ = planted(n_normal=100, n_anom=10, d=12, seed=3)
    model = DN2(k=2, pca=5).fit(X)
    t = fit_transform(X, pca=5)
    dist, _ = NearestNeighbors(n_neighbors=2).fit(t.transform(X)).kneighbors(t.transform(Q))
    np.testing.assert_allclose(model.anomaly_score(Q), dist.mean(1), rtol=1e-5)
    assert model.index_.d == 5 and model.n_features_in_ == 12


@pytest.mark.unit
def test_model_with_pca_round_trips_as_format_version_4_and_decides_the_flag(tmp_path):
    X, m = fitted(FitParams(k=2, pca=3, whiten=True))
    assert (m.meta.dim, m.meta.input_dim, m.meta.query_dim, m.meta.pca) == (3, 8, 8, 3)
    save_model(m, str(tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "model.json").read_text())["version"] == 4
    back = load_model(str(tmp_path / "m"))
    assert back.meta == m.meta
    np.testing.assert_array_equal(back.transform.transform(X), m.transform.transform(X))
    ap = parser()
    a = ap.parse_args(["score", "--query", "q", "--out", "o", "--pca", "4"])
    c = config_from_args(a, explicit_settings(ap, a))
    with pytest.raises(ConfigError, match="--pca conflicts with the saved model"):
        apply_model(c, back, frozenset(c.explicit))


@pytest.mark.unit
def test_approximate_scores_a_compressed_index_from_its_codes_without_reading_vectors():
    """``approximate=True``: distances are the codes' (FAISS's own search), the vectors are never read."""
    import faiss

    from dnnad.core.index import Shard, ShardedIndex

    rng = np.random.default_rng(0)
    X, Q = rng.normal(size=(3000, 16)).astype(np.float32), rng.normal(size=(20, 16)).astype(np.float32)
    exact = DN2(k=2, index="sq8").fit(X)
    approx = DN2(k=2, index="sq8", approximate=True).fit(X)
    shard = build_shard(X, 0, "sq8")
    D, _ = faiss.deserialize_index(shard.faiss_bytes).search(Q, 2)
    np.testing.assert_allclose(approx.anomaly_score(Q), np.sqrt(D).mean(1), rtol=1e-5)
    dist, _ = NearestNeighbors(n_neighbors=2).fit(X).kneighbors(Q)
    np.testing.assert_allclose(exact.anomaly_score(Q), dist.mean(1), rtol=1e-5)  # the default stays exact
    blind = ShardedIndex([Shard(0, np.full_like(X, np.nan), shard.faiss_bytes)], exact=False)  # vectors unreadable
    np.testing.assert_allclose(blind.search(Q, 2)[0], np.sqrt(np.maximum(D, 0)), rtol=1e-5)
    with pytest.raises(ValueError, match="approximate"):
        DN2(index="flat", approximate=True).fit(X)
    ap = parser()
    a = ap.parse_args(["score", "--query", "q", "--normal", "n", "--out", "o", "--approximate"])
    cfg = config_from_args(a, explicit_settings(ap, a)).validate()  # a saved --model may decide the index
    with pytest.raises(ConfigError, match="--approximate .* needs --index ivfpq or sq8"):
        cfg.check_fit_settings()  # a job that fits checks it before reading any data


@pytest.mark.unit
def test_the_jobs_read_out_is_l2_by_default_and_none_is_the_papers_plain_dn2():
    """Measured on CIFAR-10, Fashion-MNIST and the MTD tiles (benchmarks/RESULTS.md): L2 alone wins at every
    normal-set size; the library's DN2 stays plain unless asked."""
    ap = parser()
    base = ["score", "--query", "q", "--out", "o"]
    assert config_from_args(ap.parse_args(base)).features.normalize == "l2"
    assert config_from_args(ap.parse_args([*base, "--normalize", "none"])).features.normalize is None
    assert DN2().normalize is None
