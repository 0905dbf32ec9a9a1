"""GPU paths: FAISS on the GPU with the same exact answer, fp16 embedding. Skipped without CUDA."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
faiss = pytest.importorskip("faiss")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not hasattr(faiss, "StandardGpuResources"),
                       reason="needs a CUDA GPU and faiss-gpu"),
]


def test_gpu_search_equals_the_cpu_answer_for_every_shard_count():
    from dnnad.core.dn2 import self_exclusions
    from dnnad.core.index import ShardedIndex, build_index

    rng = np.random.default_rng(0)
    Xb = np.concatenate([rng.normal(size=(3000, 128)), np.repeat(rng.normal(size=(1, 128)), 30, 0)]).astype(np.float32)
    Xq = np.concatenate([Xb[-5:], rng.normal(size=(500, 128)).astype(np.float32)])
    d_cpu, i_cpu = build_index(Xb, 1).search(Xq, 5)
    for n_shards in (1, 3, 8):
        gpu = ShardedIndex(build_index(Xb, n_shards).shards, device="cuda")
        d, i = gpu.search(Xq, 5)
        np.testing.assert_array_equal(i, i_cpu)
        np.testing.assert_array_equal(d, d_cpu)
    ex = self_exclusions(np.arange(100))
    np.testing.assert_array_equal(ShardedIndex(build_index(Xb, 2).shards, device="cuda").search(Xb[:100], 2, ex)[1],
                                  build_index(Xb, 2).search(Xb[:100], 2, ex)[1])


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "sq8"])
def test_gpu_approximate_kinds_search(kind):
    """The GPU only proposes candidates: both devices re-rank them exactly from the vectors on the CPU
    (``exact=True``, the default), so every distance is the float64 Euclidean distance to the row it names,
    and where both devices found the same row they give it the same distance."""
    from dnnad.core.index import ShardedIndex, build_index

    rng = np.random.default_rng(1)
    Xb, Xq = rng.normal(size=(20000, 64)).astype(np.float32), rng.normal(size=(200, 64)).astype(np.float32)
    shards = build_index(Xb, 2, kind).shards
    d_gpu, i_gpu = ShardedIndex(shards, device="cuda").search(Xq, 2)
    d_cpu, i_cpu = ShardedIndex(shards).search(Xq, 2)
    for d, i in ((d_gpu, i_gpu), (d_cpu, i_cpu)):
        assert ((i >= 0) & (i < len(Xb))).all() and (i[:, 0] != i[:, 1]).all()
        exact = np.sqrt(((Xq[:, None, :].astype(np.float64) - Xb[i].astype(np.float64)) ** 2).sum(-1))
        np.testing.assert_allclose(d, exact, rtol=1e-12)
        assert (np.diff(d, axis=1) >= 0).all()  # nearest first
    same = i_gpu == i_cpu
    assert same.mean() > 0.9
    np.testing.assert_allclose(d_gpu[same], d_cpu[same], rtol=1e-12)


def test_gpu_patch_maps_equal_the_cpu_maps_leaving_each_image_out():
    """The patch bank searched on the GPU (what ``--localize`` scoring actors do when Ray has GPUs) gives the
    CPU's maps, with and without the leave-one-image-out exclusion the fit's calibration uses."""
    from dnnad.core.index import ShardedIndex, build_index
    from dnnad.core.localize import patch_maps

    rng = np.random.default_rng(2)
    grids = rng.normal(size=(12, 5, 5, 32)).astype(np.float32)  # 12 images' 5 x 5 patch grids
    bank = grids.reshape(-1, 32)
    owners = np.repeat(np.arange(12), 25)
    shards = build_index(bank, 3).shards
    cpu, gpu = ShardedIndex(shards), ShardedIndex(shards, device="cuda")
    np.testing.assert_array_equal(patch_maps(gpu, grids[:4]), patch_maps(cpu, grids[:4]))
    loo_gpu = patch_maps(gpu, grids, np.arange(12), owners, 25)
    np.testing.assert_array_equal(loo_gpu, patch_maps(cpu, grids, np.arange(12), owners, 25))
    assert (loo_gpu > 0).all()  # no patch matched its own image


def test_fp16_embedding_is_close_to_fp32():
    from dnnad.vision.backbones import FeatureExtractor, build_classifier
    from dnnad.vision.specs import get_spec

    spec = get_spec("resnet18", 64)
    x = torch.randn(8, 3, 64, 64)
    state = build_classifier(spec).state_dict()
    cpu = FeatureExtractor(spec, state, device="cpu")
    gpu = FeatureExtractor(spec, state, device="cuda")
    a, b = cpu(x), gpu(x)
    assert b.dtype == np.float32 and b.shape == a.shape
    assert np.abs(a - b).max() / np.abs(a).max() < 2e-2
