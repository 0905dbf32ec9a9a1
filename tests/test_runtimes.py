"""CPU runtimes: the same network exported once to ONNX and run by ONNX Runtime gives the torch embedding."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dnnad.cli import main
from dnnad.vision.backbones import FeatureExtractor
from dnnad.vision.runtimes import EXPORT_MARKER, cached_export, resolve_runtime
from dnnad.vision.specs import get_spec
from dnnad.vision.weights import resolve_weights
from tests.helpers import FAST, cifar_rows, read_scores, write_folder


@pytest.mark.unit
@pytest.mark.parametrize("name, size, weights, layers", [
    ("resnet18", 64, "none", ("layer2", "layer3", "final")),  # torchvision
    ("efficientnet_lite0", 224, "imagenet", ("blocks.4", "blocks.6", "final")),  # timm, the shipped weights
])
def test_onnxruntime_and_openvino_embed_as_torch_does_within_1e5_relative(name, size, weights, layers, tmp_path):
    rng = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, size, size, generator=rng) * 4 - 2
    for spec in (get_spec(name, size), get_spec(name, size, layers=layers, tta="flip")):
        state = resolve_weights(spec, weights).state_dict
        onnx = cached_export(spec, state, root=str(tmp_path))
        torch_emb = FeatureExtractor(spec, state, "cpu", threads=1)(x)
        for runtime in ("onnxruntime", "openvino"):  # OpenVINO at fp32: never its own bf16 default
            ort = FeatureExtractor(spec, None, "cpu", threads=1, onnx_model=onnx, runtime=runtime)
            assert ort.runtime == runtime
            ort_emb = ort(x)
            assert ort_emb.shape == torch_emb.shape and np.isfinite(ort_emb).all()
            assert np.abs(ort_emb - torch_emb).max() <= 1e-5 * np.abs(torch_emb).max(), runtime
    files = os.listdir(tmp_path / "onnx")
    assert EXPORT_MARKER in files and len([f for f in files if f.endswith(".onnx")]) == 2  # one per read-out


@pytest.mark.unit
def test_an_export_is_cached_by_weights_and_read_out(tmp_path):
    spec = get_spec("resnet18", 32)
    a = resolve_weights(spec, "none").state_dict
    first = cached_export(spec, a, root=str(tmp_path))
    (path,) = (tmp_path / "onnx").glob("*.onnx")
    mtime = path.stat().st_mtime_ns
    assert cached_export(spec, {k: v.clone() for k, v in a.items()}, root=str(tmp_path)) == first
    assert path.stat().st_mtime_ns == mtime  # read from the cache, not exported again
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in a.items()}
    cached_export(spec, changed, root=str(tmp_path))
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2  # other weights, another export


@pytest.mark.unit
def test_auto_is_onnxruntime_on_cpu_and_torch_on_gpu():
    spec = get_spec("efficientnet_lite2")
    assert resolve_runtime("auto", spec, gpu=False) == "onnxruntime"
    assert resolve_runtime("auto", spec, gpu=True) == "torch"
    assert resolve_runtime("torch", spec, gpu=False) == "torch"
    assert resolve_runtime("openvino", get_spec("onnx:/m.onnx"), gpu=False) == "openvino"
    assert resolve_runtime("auto", get_spec("onnx:/m.onnx"), gpu=False) == "onnxruntime"


@pytest.mark.ray
def test_the_job_embeds_with_onnxruntime_by_default_and_records_it(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("DNNAD_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_folder(data, cifar_rows("train", 1, 40))
    args = ["score", "--normal", str(data), "--query", str(data), *FAST]
    assert main([*args, "--out", str(tmp_path / "ort")]) == 0
    assert main([*args, "--out", str(tmp_path / "torch"), "--runtime", "torch"]) == 0
    assert main([*args, "--out", str(tmp_path / "openvino"), "--runtime", "openvino"]) == 0
    ref = read_scores(tmp_path / "torch")
    for name in ("ort", "openvino"):
        got = read_scores(tmp_path / name)
        assert got["id"].to_pylist() == ref["id"].to_pylist()
        np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), rtol=1e-4, atol=1e-6)
    record = json.loads((tmp_path / "ort" / "run.json").read_text())
    assert record["runtime"]["name"] == "onnxruntime" and record["runtime"]["version"]
    assert json.loads((tmp_path / "torch" / "run.json").read_text())["runtime"]["name"] == "torch"
    assert json.loads((tmp_path / "openvino" / "run.json").read_text())["runtime"]["name"] == "openvino"
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1  # exported once, on the driver


@pytest.mark.unit
def test_an_onnx_embedding_actor_runs_without_torch_in_its_process(tmp_path):
    """Actors start faster without torch (2.4 s of imports each): the ONNX path of the Embedder reads,
    decodes, crops, normalises and embeds with PIL, numpy and ONNX Runtime alone, the torch embedding's
    values within 1e-5 relative."""
    import subprocess
    import sys

    from dnnad.stages.embed import Embedder
    from tests.helpers import ROOT

    spec = get_spec("efficientnet_lite0", 64)
    state = resolve_weights(spec, "imagenet").state_dict
    (tmp_path / "net.onnx").write_bytes(cached_export(spec, state, root=str(tmp_path)))
    rows = cifar_rows("test", None, 5)
    images = rows["image"].to_pylist()
    torch_emb = Embedder(spec, state, device="cpu", threads=1, batch_size=4)(
        {"id": np.array(list("abcde"), object), "image": np.array(images, object)})["embedding"].to_pylist()
    torch_emb = np.array(torch_emb, np.float32)
    np.save(tmp_path / "images.npy", np.array(images, object), allow_pickle=True)
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch fails
import numpy as np
from dnnad.stages.embed import Embedder
from dnnad.vision.specs import get_spec
e = Embedder(get_spec("efficientnet_lite0", 64), None, device="cpu", threads=1, batch_size=4,
             onnx_model=open({str(tmp_path / "net.onnx")!r}, "rb").read())
images = np.load({str(tmp_path / "images.npy")!r}, allow_pickle=True)
out = e({{"id": np.array(list("abcde"), object), "image": images}})
assert out["status"].to_pylist() == ["ok"] * 5
np.save({str(tmp_path / "onnx.npy")!r}, np.array(out["embedding"].to_pylist(), np.float32))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    onnx_emb = np.load(tmp_path / "onnx.npy")
    assert onnx_emb.shape == torch_emb.shape == (5, 1280)
    assert np.abs(onnx_emb - torch_emb).max() <= 1e-5 * np.abs(torch_emb).max()


@pytest.mark.ray
def test_bf16_is_a_model_setting_run_by_openvino(ray_local, tmp_path, monkeypatch):
    """``--precision bf16``: OpenVINO's bf16 inference, 3x the images/s of fp32 on CPUs that have it; not the
    fp32 embedding, so the model records it and a query with the fp32 embedding is refused."""
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16")
    monkeypatch.setenv("DNNAD_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_folder(data, cifar_rows("train", 1, 40))
    args = ["score", "--normal", str(data), "--query", str(data), *FAST]
    assert main([*args, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert main([*args, "--out", str(tmp_path / "fp32")]) == 0
    bf16, fp32 = read_scores(tmp_path / "bf16"), read_scores(tmp_path / "fp32")
    assert bf16["id"].to_pylist() == fp32["id"].to_pylist()
    diff = np.abs(bf16["score"].to_numpy() - fp32["score"].to_numpy()) / fp32["score"].to_numpy()
    assert 0 < diff.max() < 0.2  # another embedding, near the fp32 one
    record = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert record["runtime"]["name"] == "openvino"
    meta = json.loads((tmp_path / "bf16" / "model" / "model.json").read_text())["meta"]
    assert meta["precision"] == "bf16"
    assert main(["score", "--model", str(tmp_path / "bf16" / "model"), "--query", str(data), "--precision", "fp32",
                 "--out", str(tmp_path / "mixed"), *FAST]) == 2
