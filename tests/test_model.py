"""The model format: round trip, validation on load, and never replacing a directory dnnad did not write."""
import json

import numpy as np
import pytest

from dnnad.core.dn2 import FitParams, fit_reference
from dnnad.core.index import build_shard, shard_bounds
from dnnad.core.model import ModelError, is_model_dir, load_model, model_from_fit, save_model
from tests.helpers import planted, tree_digest

pytestmark = pytest.mark.unit


def fitted(n_shards=2):
    X, _ = planted(n_normal=120, n_anom=5, d=8)
    params = FitParams(k=2, n_shards=n_shards)
    fit = fit_reference(X, None, params)
    shards = [build_shard(fit.reference[a:b], a) for a, b in shard_bounds(len(X), n_shards)]
    return model_from_fit(fit, shards, params, backbone="resnet18", image_size=32, weights="none")


def test_round_trip(tmp_path):
    m = fitted()
    save_model(m, str(tmp_path / "m"))
    assert is_model_dir(str(tmp_path / "m"))
    back = load_model(str(tmp_path / "m"))
    assert back.k == m.k and back.threshold == m.threshold and back.meta == m.meta
    np.testing.assert_array_equal(back.calibration_scores, m.calibration_scores)
    assert [s.offset for s in back.shards] == [0, 62]


def test_normal_percentile_is_the_share_of_normal_scores_below():
    m = fitted()
    s = m.calibration_scores
    p = m.normal_percentile(np.array([s.min() - 1, s[len(s) // 2], s.max() + 1]))
    assert p[0] == 0.0 and p[2] == 100.0 and 40 < p[1] < 60


def test_a_user_directory_is_never_replaced(tmp_path):
    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"precious")
    before = tree_digest(mine)
    with pytest.raises(ModelError, match="holds no dnnad model"):
        save_model(fitted(), str(mine), replace=True)
    assert tree_digest(mine) == before and not is_model_dir(str(mine))
    save_model(fitted(), str(tmp_path / "empty-ok"))
    with pytest.raises(ModelError, match="--overwrite"):
        save_model(fitted(), str(tmp_path / "empty-ok"))
    save_model(fitted(n_shards=1), str(tmp_path / "empty-ok"), replace=True)
    assert len(load_model(str(tmp_path / "empty-ok")).shards) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty-ok"]  # no temporary leftovers


@pytest.mark.parametrize("field, value, match", [
    ("k", 0, "k=0"), ("k", 10_000, "k="), ("threshold", "NaN", "threshold"), ("version", 1, "format version"),
    ("format", "other", "not a dnnad model"),
])
def test_damaged_metadata_is_refused(tmp_path, field, value, match):
    save_model(fitted(), str(tmp_path / "m"))
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    doc[field] = float("nan") if value == "NaN" else value
    (tmp_path / "m" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=match):
        load_model(str(tmp_path / "m"))


def test_damaged_vectors_are_refused(tmp_path):
    save_model(fitted(), str(tmp_path / "m"))
    v = np.load(tmp_path / "m" / "shard-001.npy")
    v[0, 0] = np.inf
    np.save(tmp_path / "m" / "shard-001.npy", v)
    with pytest.raises(ModelError, match="NaN or inf"):
        load_model(str(tmp_path / "m"))
    np.save(tmp_path / "m" / "shard-001.npy", v[:, :3])
    with pytest.raises(ModelError, match="expected float32"):
        load_model(str(tmp_path / "m"))


def test_a_compressed_model_maps_its_vectors_from_disk(tmp_path):
    from dnnad.core.index import ShardedIndex

    X, _ = planted(n_normal=400, n_anom=5, d=16)
    params = FitParams(k=2, n_shards=2, index="sq8")
    fit = fit_reference(X, None, params)
    shards = [build_shard(fit.reference[a:b], a, "sq8") for a, b in shard_bounds(len(X), 2)]
    save_model(model_from_fit(fit, shards, params, backbone="resnet18", image_size=32, weights="none"),
               str(tmp_path / "m"))
    back = load_model(str(tmp_path / "m"))
    assert all(isinstance(s.vectors, np.memmap) for s in back.shards)
    np.testing.assert_array_equal(ShardedIndex(back.shards).search(X[:20], 2)[1],
                                  ShardedIndex(shards).search(X[:20], 2)[1])
