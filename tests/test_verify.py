"""Duplicate verification on Ray tasks: the rank job's fingerprint similarities, spread over the cluster."""
import numpy as np
import pytest
from PIL import Image

from dnnad.core.duplicates import fingerprint_similarity
from dnnad.stages.verify import pair_pieces, parallel_similarity
from dnnad.vision.fingerprint import fingerprint


def pictures(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([fingerprint(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (32, 32), Image.BICUBIC)) for _ in range(n)])


@pytest.mark.unit
def test_pieces_hold_every_pair_once_and_never_split_a_row_of_b():
    b = np.random.default_rng(1).integers(0, 40, 500)
    pieces = pair_pieces(b, 60)
    assert len(pieces) > 4 and np.array_equal(np.sort(np.concatenate(pieces)), np.arange(500))
    owner = {int(v): i for i, p in enumerate(pieces) for v in b[p]}
    assert all(owner[int(v)] == i for i, p in enumerate(pieces) for v in b[p])
    assert pair_pieces(np.full(7, 3), 2)[0].tolist() == list(range(7))  # one row of b: one piece
    assert pair_pieces(np.zeros(0, np.int64), 5) == []


@pytest.mark.ray
def test_tasks_measure_what_one_process_measures(ray_local):
    F = pictures(40)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 40, 300), rng.integers(0, 40, 300)
    # equal up to float32 rounding: the BLAS blocks a product by how many rows it multiplies, and by its threads
    np.testing.assert_allclose(parallel_similarity(F, a, b, pairs_per_task=50), fingerprint_similarity(F, a, b),
                               rtol=0, atol=1e-5)
