"""Near-duplicate groups: candidate pairs from a kNN search → ratio test and fingerprints → complete linkage."""
import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dnnad.core.arrays import l2_normalize
from dnnad.core.dn2 import FitParams, fit_reference
from dnnad.core.duplicates import (
    EXTRA_NEIGHBOURS,
    VECTOR_SHARE,
    candidate_pairs,
    find_duplicates,
    fingerprint_descriptors,
    fingerprint_neighbours,
    fingerprint_similarity,
    neighbourhood_level,
    neighbourhood_scale,
    pair_check,
    pair_distances,
)
from dnnad.vision.fingerprint import fingerprint

pytestmark = pytest.mark.unit


def cloud(n: int = 60, d: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def neighbours(X: np.ndarray, exclude_duplicates: bool = False) -> np.ndarray:
    fit = fit_reference(X, None, FitParams(k=2, extra_neighbours=EXTRA_NEIGHBOURS,
                                           exclude_duplicates=exclude_duplicates))
    return fit.neighbour_pos


def picture(seed: int, size: int = 32) -> Image.Image:
    """A random smooth colour picture (upsampled noise): a stand-in photo."""
    noise = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((size, size), Image.BICUBIC)


def prints(*images: Image.Image) -> np.ndarray:
    return np.stack([fingerprint(im) for im in images])


def test_no_duplicates_no_groups():
    X = cloud()
    g = find_duplicates(X, neighbours(X), prints(*(picture(i) for i in range(60))))
    assert g.n_groups == 0 and (g.group == -1).all() and np.isnan(g.distance).all()
    assert len(g.members) == 0 and len(g.redundant) == 0


def test_planted_copies_form_groups_numbered_by_first_member():
    rng = np.random.default_rng(1)
    X = cloud()
    X[40] = X[3] * 3.0  # same direction, other scale: distance 0 once normalised
    X[41] = X[3] + rng.normal(scale=0.01, size=64)  # near copies of 3
    X[42] = X[41] + rng.normal(scale=0.01, size=64)
    X[50] = X[10] + rng.normal(scale=0.01, size=64)
    images = [picture(i) for i in range(60)]
    images[40] = images[41] = images[42] = images[3]
    images[50] = ImageOps.mirror(images[10])  # a mirrored copy verifies too
    g = find_duplicates(X, neighbours(X), prints(*images))
    assert g.n_groups == 2
    assert g.first.tolist() == [3, 10] and g.size.tolist() == [4, 2]
    assert g.members.tolist() == [3, 40, 41, 42, 10, 50]
    assert g.redundant.tolist() == [40, 41, 42, 50]
    assert g.distance[3] == 0.0 and g.distance[40] == pytest.approx(0.0, abs=1e-6)
    Xn = l2_normalize(X, np.float64)
    assert g.distance[42] == pytest.approx(np.linalg.norm(Xn[42] - Xn[3]))
    assert (g.group[np.setdiff1d(np.arange(60), [3, 40, 41, 42, 10, 50])] == -1).all()


def test_look_alikes_whose_pictures_differ_are_not_grouped():
    X = cloud()
    X[20] = X[7] + 0.001  # as close as a copy in embedding space ...
    images = [picture(i) for i in range(60)]
    assert find_duplicates(X, neighbours(X), prints(*images)).n_groups == 0  # ... but another picture
    images[20] = images[7]
    assert find_duplicates(X, neighbours(X), prints(*images)).n_groups == 1
    assert find_duplicates(X, neighbours(X), None).n_groups == 1  # vectors alone: the ratio test decides


def near_pair():
    """A cloud where row 20 sits 0.05 from row 7: (X, its neighbours, the pair's ratio, the pictures)."""
    X = cloud()
    X[20] = X[7] + 0.05
    nb = neighbours(X)
    r = pair_distances(X, np.array([7]), np.array([20]))[0] / max(neighbourhood_scale(X, nb)[[7, 20]])
    return X, nb, r, [picture(i) for i in range(60)]


def test_ratio_test_decides_against_the_neighbourhood():
    X, nb, r, images = near_pair()
    images[20] = images[7]
    F = prints(*images)  # identical fingerprints: the ratio test alone decides, at the full bound
    assert find_duplicates(X, nb, F, max_ratio=r * 1.001).n_groups == 1
    assert find_duplicates(X, nb, F, max_ratio=r * 0.999).n_groups == 0
    vectors = r / VECTOR_SHARE  # vectors: a share of the bound
    assert find_duplicates(X, nb, None, max_ratio=vectors * 1.001).n_groups == 1
    assert find_duplicates(X, nb, None, max_ratio=vectors * 0.999).n_groups == 0


def test_the_two_tests_trade_off_linearly():
    X, nb, r, images = near_pair()
    images[20] = ImageEnhance.Contrast(images[7]).enhance(0.5).rotate(3, Image.BICUBIC)
    F = prints(*images)
    check = pair_check(X, nb, F)[0]
    u = check.excess(np.array([7]), np.array([20]))[0]
    assert 0.5 < u < 1  # altered, not identical, yet beyond its look-alikes
    ratio = 0.5
    exact = 1 - (1 - u) / (1 - r / ratio)  # the excess bound that puts this pair on the line
    assert find_duplicates(X, nb, F, ratio, exact - 1e-3).n_groups == 1
    assert find_duplicates(X, nb, F, ratio, exact + 1e-3).n_groups == 0


def test_groups_never_chain_distinct_pictures():
    """Pictures 0..5 cross-fade from one scene to another: each verifies with the next, the ends do not;
    single linkage would make one group of six; complete linkage keeps groups whose members all verify."""
    X = cloud(80, 16)
    step = np.random.default_rng(2).normal(size=16).astype(np.float32) * 0.02
    images = [picture(100 + i) for i in range(80)]
    first, last = np.asarray(picture(7), np.float64), np.asarray(picture(8), np.float64)
    for i in range(6):
        X[i] = X[0] + i * step
        images[i] = Image.fromarray(np.uint8((1 - i / 5) * first + i / 5 * last))
    F = prints(*images)
    nb = neighbours(X)
    check = pair_check(X, nb, F)[0]
    assert check(np.arange(5), np.arange(1, 6)).all()  # a chain of verified pairs 0-1-2-3-4-5
    assert not check(np.array([0]), np.array([5]))[0]  # the two scenes are not one picture
    g = find_duplicates(X, nb, F)
    assert g.size.tolist() == [3, 3]
    for gid in range(g.n_groups):
        rows = np.flatnonzero(g.group == gid)
        assert check(np.repeat(rows, len(rows)), np.tile(rows, len(rows))).all()  # every pair within a group verifies


def test_same_labels_always_group_even_if_the_search_skips_them():
    X = cloud()
    X[30] = X[2]
    X[31] = X[2]
    nb = neighbours(X, exclude_duplicates=True)  # identical vectors are not each other's neighbours
    images = prints(*(picture(i) for i in range(60)))
    assert find_duplicates(X, nb, images).n_groups == 0
    hashes = np.array([b"h%d" % i for i in range(60)], dtype="S8")
    hashes[[30, 31]] = hashes[2]
    g = find_duplicates(X, nb, images, same=[hashes])
    assert g.n_groups == 1 and g.members.tolist() == [2, 30, 31] and g.size.tolist() == [3]


def test_fingerprints_survive_re_saving_cropping_and_rotating_and_tell_pictures_apart():
    photo = picture(5, 96)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=50)
    altered = [Image.open(io.BytesIO(buf.getvalue())), photo.resize((40, 40)), ImageOps.mirror(photo),
               ImageEnhance.Brightness(photo).enhance(1.3), ImageOps.expand(photo, 8, (255, 0, 0)),
               photo.rotate(4, Image.BICUBIC), photo.rotate(-7, Image.BICUBIC),
               photo.crop((8, 2, 96, 90)).resize((96, 96), Image.BICUBIC)]  # aligned, not compared as they lie
    F = prints(photo, *altered, *(picture(s, 96) for s in range(20, 40)))
    sim = fingerprint_similarity(F, np.zeros(len(F) - 1, np.int64), np.arange(1, len(F)))
    assert (sim[:len(altered)] >= 0.8).all()
    assert (sim[len(altered):] < 0.8).all()
    flat = prints(Image.new("RGB", (32, 32), (9, 9, 9)), photo)
    assert fingerprint_similarity(flat, np.array([0]), np.array([1]))[0] == 0.0


def garment(seed: int, size: int = 28) -> Image.Image:
    """A small textured object on black, narrower than it is tall: a stand-in Fashion-MNIST garment."""
    img = Image.new("RGB", (size, size))
    img.paste(picture(seed, 24).resize((14, 24), Image.BICUBIC), (7, 2))
    return img


def test_a_small_objects_fingerprint_survives_resampling_and_a_crop_of_its_box():
    # a 28 px garment halved or doubled, and one column cut off its box (14 x 24 -> 13 x 24): each copy's
    # trimmed box is enlarged to the grid, and Lanczos keeps it matching its source above every other garment
    # (a box filter, repeating pixels in a pattern set by the box's size, gave the halved copy 0.73)
    shirt = garment(1)
    cropped = Image.new("RGB", (28, 28))
    cropped.paste(shirt.crop((8, 0, 28, 28)), (8, 0))
    copies = [shirt.resize((14, 14), Image.BICUBIC), shirt.resize((56, 56), Image.BICUBIC), cropped]
    F = prints(shirt, *copies, *(garment(s) for s in range(20, 40)))
    sim = fingerprint_similarity(F, np.zeros(len(F) - 1, np.int64), np.arange(1, len(F)))
    assert (sim[:len(copies)] >= 0.85).all() and sim[:len(copies)].min() > sim[len(copies):].max()


def test_a_rows_level_is_the_median_similarity_of_its_candidate_pairs():
    a, b, s = np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([0.2, 0.6, 0.4])
    # row 0: {0.2, 0.6}; row 1: {0.2, 0.4}; row 2: {0.6, 0.4}; row 3: no pairs
    assert neighbourhood_level(4, a, b, s).tolist() == pytest.approx([0.4, 0.3, 0.5, 0.0])


def test_levels_and_checks_in_slices_equal_one_pass(monkeypatch):
    import dnnad.core.duplicates as dup

    X = cloud(300, 16, seed=5)
    X[150:170] = X[:20] + 0.01 * cloud(20, 16, seed=6)  # near copies among the candidates
    nb = neighbours(X)
    rng = np.random.default_rng(7)
    a, b, s = rng.integers(0, 300, 2000), rng.integers(0, 300, 2000), rng.random(2000)
    whole = neighbourhood_level(300, a, b, s)
    check, ca, cb, cd = pair_check(X, nb)
    ok, groups = check(ca, cb, cd), find_duplicates(X, nb).group
    monkeypatch.setattr(dup, "LEVEL_PAIRS", 64)  # 2 * 2000 entries in passes of ~64: about 60 passes
    monkeypatch.setattr(dup, "CHECK_PAIRS", 7)
    np.testing.assert_array_equal(neighbourhood_level(300, a, b, s), whole)
    np.testing.assert_array_equal(check(ca, cb, cd), ok)
    np.testing.assert_array_equal(find_duplicates(X, nb).group, groups)
    assert ok.sum() >= 20


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
    from dnnad.config import ConfigError
    from dnnad.core.settings import DUPLICATE_RATIO, DUPLICATE_SIMILARITY

    r = rank_cfg().rank
    assert r.duplicates and not r.drop_duplicates
    assert (r.duplicate_ratio, r.duplicate_similarity) == (DUPLICATE_RATIO, DUPLICATE_SIMILARITY)
    r = rank_cfg("--no-duplicates").rank
    assert not r.duplicates
    r = rank_cfg("--duplicate-ratio", "0.7", "--duplicate-similarity", "0.9", "--drop-duplicates").rank
    assert r.drop_duplicates and (r.duplicate_ratio, r.duplicate_similarity) == (0.7, 0.9)
    for flags, msg in ((["--duplicate-ratio", "0"], "in \\(0, 2\\]"), (["--duplicate-similarity", "1"], "in \\[-3, 1\\)"),
                       (["--no-duplicates", "--drop-duplicates"], "needs the duplicate groups"),
                       (["--drop-duplicates", "--reduce", "kmeans:4"], "--reduce")):
        with pytest.raises(ConfigError, match=msg):
            rank_cfg(*flags).validate()


def moved_copy():
    """60 pictures in an embedding cloud and a blurred copy of picture 7 whose vector another picture's region of
    the cloud holds: the embedding search does not offer the pair, its fingerprint still matches."""
    X = np.vstack([cloud(), cloud(1, seed=9)])
    images = [picture(i) for i in range(60)] + [picture(7).filter(ImageFilter.GaussianBlur(0.8))]
    return X, prints(*images)


def test_a_copy_the_embedding_moved_away_is_found_by_its_fingerprint():
    X, F = moved_copy()
    nb = neighbours(X)
    assert 7 not in nb[60] and 60 not in nb[7]
    assert find_duplicates(X, nb, F).n_groups == 0
    more = fingerprint_neighbours(F)
    assert more[60, 0] == 7
    g = find_duplicates(X, nb, F, more=more)
    assert g.n_groups == 1 and g.group[7] == g.group[60] == 0
    _, a, b, _ = pair_check(X, nb, None)
    _, a2, b2, _ = pair_check(X, nb, None, more=more)  # without fingerprints there is no second list
    assert np.array_equal(a2, a) and np.array_equal(b2, b)


def test_second_search_pairs_set_no_level_and_the_ratio_bounds_them():
    X, F = moved_copy()
    nb, more = neighbours(X), fingerprint_neighbours(F)
    alone, a, b, _ = pair_check(X, nb, F)
    both, a2, b2, d2 = pair_check(X, nb, F, more=more)
    np.testing.assert_array_equal(both.level, alone.level)
    np.testing.assert_array_equal(both.scale, alone.scale)
    assert np.array_equal(a2[:len(a)], a) and np.array_equal(b2[:len(b)], b)
    extra = slice(len(a), None)
    keys = np.minimum(a2, b2) * len(X) + np.maximum(a2, b2)
    assert len(np.unique(keys[extra])) == len(keys[extra]) and not np.isin(keys[extra], keys[:len(a)]).any()
    assert len(a2) > len(a) and (both.ratio(a2[extra], b2[extra], d2[extra]) <= 2.0).all()
    lo, hi = np.minimum(a2, b2), np.maximum(a2, b2)  # each unordered pair measured once, lower row first
    np.testing.assert_allclose(both.similarity(a2, b2), fingerprint_similarity(F, lo, hi), atol=1e-6)


def test_fingerprint_neighbours_are_the_nearest_descriptors_and_skip_flat_prints():
    F = prints(*(picture(i) for i in range(40)), Image.new("RGB", (32, 32), (90, 90, 90)))
    G = fingerprint_descriptors(F)
    assert G.shape == (41, 144) and G.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(G[:40], axis=1), 1.0, rtol=1e-5)
    assert not G[40].any()  # a flat fingerprint
    more = fingerprint_neighbours(F, k=5)
    assert (more[40] == -1).all() and not (more == 40).any()
    D = ((G[:40, None] - G[None, :40]) ** 2).sum(-1)
    np.fill_diagonal(D, np.inf)
    np.testing.assert_array_equal(np.sort(more[:40], axis=1), np.sort(np.argsort(D, axis=1, kind="stable")[:, :5], axis=1))
