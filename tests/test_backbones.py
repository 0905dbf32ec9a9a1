"""Backbones and weights: offline ImageNet Lite2 is right, files load safely, bad files fail clearly."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dnnad.config import ConfigError, EmbedConfig, JobConfig, SourceConfig
from dnnad.vision.backbones import FeatureExtractor, build_classifier, preprocess_fn
from dnnad.vision.specs import get_spec
from dnnad.vision.weights import WeightsError, resolve_weights
from tests.helpers import ROOT, make_corpus

IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.unit
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_packaged_lite_weights_classify_chelsea_as_a_cat(name):
    from skimage.data import chelsea

    spec = get_spec(name)
    weights = resolve_weights(spec, "imagenet")
    model = build_classifier(spec)
    model.load_state_dict(weights.state_dict)
    x = preprocess_fn(spec)(Image.fromarray(chelsea()))[None]
    with torch.inference_mode():
        top = int(model.eval()(x).argmax())
    assert top in IMAGENET_CAT_CLASSES
    assert weights.source == "imagenet" and "sha256:" in weights.identity


@pytest.mark.unit
def test_features_are_pooled_penultimate_activations():
    spec = get_spec("efficientnet_lite2")
    fe = FeatureExtractor(spec, resolve_weights(spec, "imagenet").state_dict, device="cpu")
    out = fe(torch.zeros(2, 3, 260, 260))
    assert out.shape == (2, 1280) and out.dtype == np.float32


@pytest.mark.unit
def test_weights_file_round_trip_and_wrong_architecture(tmp_path):
    spec = get_spec("resnet18")
    sd = build_classifier(spec).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    loaded = resolve_weights(spec, str(path))
    assert loaded.source == "path"
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in sd.items())
    with pytest.raises(WeightsError, match="does not match resnet50"):
        resolve_weights(get_spec("resnet50"), str(path))


@pytest.mark.unit
def test_weights_file_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": os.system}, path)  # a pickle that references a callable
    with pytest.raises(WeightsError, match="weights_only"):
        resolve_weights(get_spec("resnet18"), str(path))


@pytest.mark.ray  # runs jobs/score.py
def test_imagenet_weights_offline_fail_fast_naming_the_alternatives(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "b.png")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty-cache"),
           "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "jobs/score.py", "--normal", str(tmp_path), "--query", str(tmp_path),
                          "--out", str(tmp_path / "out"), "--backbone", "resnet50", "--weights", "imagenet"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--weights PATH" in out.stderr and "not cached" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.unit
def test_onnx_model_is_an_embedder(tmp_path):
    spec = get_spec("resnet18", image_size=64)
    torch.manual_seed(0)
    net = build_classifier(spec).eval()
    net.fc = torch.nn.Identity()
    path = tmp_path / "r18.onnx"
    x = torch.randn(2, 3, 64, 64)
    torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["features"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    onnx_spec = get_spec(f"onnx:{path}#features", image_size=64)
    weights = resolve_weights(onnx_spec, "imagenet")
    assert weights.state_dict is None and "sha256:" in weights.identity
    got = FeatureExtractor(onnx_spec, None, device="cpu")(x)
    with torch.inference_mode():
        np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.unit
def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet7'"):
        JobConfig(kind="score", out="x", query=SourceConfig("y"), embed=EmbedConfig("resnet7")).validate()


@pytest.mark.unit
@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_embeddings_do_not_depend_on_how_rows_are_batched(tmp_path, runtime):
    """torch pads a short batch to the batch size (its kernels may differ by batch shape); the exported
    runtimes run it as it is, which must give the same bits (their CPU kernels compute each image alone)."""
    from dnnad.stages.embed import Embedder
    from dnnad.vision.runtimes import cached_export

    spec = get_spec("efficientnet_lite0", 64)
    state = resolve_weights(spec, "imagenet").state_dict
    onnx = None if runtime == "torch" else cached_export(spec, state, root=str(tmp_path / "cache"))
    emb = Embedder(spec, state, device="cpu", batch_size=4, onnx_model=onnx, runtime=runtime)
    corpus = make_corpus(tmp_path, query=6)  # a batch of 4 and one of 2, against 6 batches of 1
    ids = sorted(corpus.good)
    batch = {"id": np.array(ids, dtype=object), "path": np.array([str(corpus.query / i) for i in ids], dtype=object)}
    whole = np.stack(emb(batch)["embedding"].to_numpy(zero_copy_only=False))
    one_by_one = np.stack([np.stack(emb({k: v[i:i + 1] for k, v in batch.items()})["embedding"].to_numpy(
        zero_copy_only=False))[0] for i in range(len(ids))])
    np.testing.assert_array_equal(whole, one_by_one)  # bit-identical
