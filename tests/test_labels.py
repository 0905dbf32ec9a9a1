"""Labelled data: each label ranked against itself, and every label reviewed against its neighbours' labels."""
import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnad.cli import main
from dnnad.core.dn2 import FitParams, NoNeighbours, fit_reference, rank_within_groups
from dnnad.core.labels import label_rows, review_labels, tally_votes
from tests.helpers import cifar_rows, write_folder

LITE0 = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "64", "--quiet"]
DEFAULT = ["--weights", "imagenet", "--quiet"]  # Lite2 at 260 px: the label review's measured setting


@pytest.mark.unit
def test_neighbours_out_voting_a_label_make_it_a_suspect_with_their_label_suggested():
    labels = np.array(["cat"] * 4 + ["dog"] * 4)
    labels[1] = "dog"  # filed under the wrong label: its neighbours are cats
    pos = np.array([[2, 3, 1], [0, 2, 3], [0, 3, 1], [0, 2, 1], [5, 6, 7], [4, 6, 7], [4, 5, 7], [4, 5, 6]])
    dist = np.full(pos.shape, 0.5)
    r = review_labels(labels, pos, dist)
    assert r.suspect.tolist() == [False, True, False, False, False, False, False, False]
    assert r.suggested[1] == "cat" and r.agreement[1] == 0.0 and r.score[1] == 1.0
    assert r.agreement[0] == pytest.approx(2 / 3)  # one of its three neighbours (row 1) now says dog
    assert np.argmax(r.score) == 1


@pytest.mark.unit
def test_the_margin_must_agree_before_a_label_is_suspected():
    """Row 0 is out-voted by b, but its own label's images are nearer than b's: not a suspect; its score
    adds the margin own / (own + other) to the vote."""
    labels = np.array(["a", "b", "b", "a"])
    pos = np.array([[1, 2, 3], [2, 0, 3], [1, 0, 3], [0, 1, 2]])
    dist = np.array([[0.30, 0.31, 0.32], [0.1, 0.30, 0.4], [0.1, 0.31, 0.4], [0.32, 0.4, 0.4]])
    near_own = np.array([0.2, 0.1, 0.1, 0.32])  # row 0's two nearest "a"s (from the per-label ranking)
    r = review_labels(labels, pos, dist, near_own, k=2)
    other0 = (0.30 + 0.31) / 2  # its two nearest "b"s, from the list
    assert r.margin[0] == pytest.approx(0.2 / (0.2 + other0)) and not r.suspect[0]
    assert r.score[0] == pytest.approx(1 - r.agreement[0] + r.margin[0])
    far_own = near_own.copy()
    far_own[0] = 0.9
    assert review_labels(labels, pos, dist, far_own, k=2).suspect[0]
    assert review_labels(labels, pos, dist).suspect[0]  # the vote alone


@pytest.mark.unit
def test_nearer_neighbours_vote_louder_and_missing_ones_not_at_all():
    labels = np.array(["a", "a", "b", "b"])
    pos = np.array([[2, 1, 3], [0, -1, -1], [3, 0, 1], [2, -1, -1]])
    near_a = np.array([[5.0, 0.1, 5.0], [1.0, 0, 0], [1.0, 1.0, 1.0], [1.0, 0, 0]])
    r = review_labels(labels, pos, near_a)
    assert not r.suspect[0]  # one near "a" outweighs two far "b"s
    assert review_labels(labels, pos, near_a, weighting="uniform").suspect[0]
    assert r.agreement[1] == 1.0 and r.agreement[3] == 1.0  # only valid neighbours vote


def dense_votes(code, ncode, w, n_labels):
    """The vote table written out: one column per label (what tally_votes must equal without forming it)."""
    votes = np.zeros((len(code), n_labels))
    np.add.at(votes, (np.repeat(np.arange(len(code)), ncode.shape[1]), ncode.ravel()), w.ravel())
    return votes


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(1, 6), st.integers(1, 5), st.booleans(), st.integers(0, 2**31 - 1))
def test_votes_tallied_per_row_equal_the_whole_vote_table(n, c, n_labels, ties, seed):
    rng = np.random.default_rng(seed)
    code = rng.integers(0, n_labels, n)
    ncode = rng.integers(0, n_labels, (n, c))
    valid = rng.random((n, c)) < 0.8
    w = np.where(valid, 1.0 if ties else rng.random((n, c)), 0.0)  # uniform weights make ties
    total, own, best, best_w = tally_votes(code, ncode, w, valid)
    votes = dense_votes(code, ncode, w, n_labels)
    np.testing.assert_allclose(total, votes.sum(1))
    np.testing.assert_allclose(own, votes[np.arange(n), code])
    voted = votes.sum(1) > 0
    np.testing.assert_array_equal(best[voted], votes.argmax(1)[voted])  # argmax: the lowest label among ties
    np.testing.assert_allclose(best_w, votes.max(1))
    assert (best[~voted] == code[~voted]).all()


@pytest.mark.unit
def test_rows_of_each_label_found_with_one_sort():
    names = np.array(["b", None, "a", 3, "b", "3"], dtype=object)
    got = [(name, rows.tolist()) for name, rows in label_rows(names)]
    assert got == [("3", [3, 5]), ("a", [2]), ("b", [0, 4])]  # 3 and "3" are one label; None is no label
    assert label_rows(np.array([None, None], dtype=object)) == []


def class_folders(root, planted: int = 3, per_class: int = 60):
    """``per_class`` automobiles under automobile/, as many frogs under frog/, and ``planted`` more frogs filed
    under automobile/: the images a label review must find."""
    cars, frogs = cifar_rows("train", 1, per_class), cifar_rows("train", 6, per_class + planted)
    write_folder(root, cars, "automobile")
    write_folder(root, frogs.slice(0, per_class), "frog")
    return write_folder(root, frogs.slice(per_class, planted), "automobile")


@pytest.mark.ray
def test_class_folders_rank_per_label_and_find_images_under_the_wrong_label(ray_local, tmp_path):
    data = tmp_path / "data"
    wrong = class_folders(data)
    out = tmp_path / "out"
    assert main(["rank", "--data", str(data), "--out", str(out), "--label-column", "dir:1", "--drop-suspects",
                 *DEFAULT]) == 0
    ranking = pq.read_table(out / "ranking").to_pylist()
    every = sorted(str(p.relative_to(data)) for p in data.rglob("*.jpg"))
    assert sorted(r["id"] for r in ranking) == every  # every row once
    assert {r["label"] for r in ranking} == {"automobile", "frog"}
    for r in ranking:
        assert r["label"] == r["id"].split("/")[0]
        assert set(r["neighbor_ids"]) <= {i for i in every if i.startswith(r["label"] + "/")}  # within its label
        assert len(r["neighbor_labels"]) == 10 and 0.0 <= r["label_agreement"] <= 1.0
    suspects = {r["id"]: r for r in ranking if r["suspect"]}
    assert set(wrong) <= set(suspects)
    assert all(suspects[w]["suggested_label"] == "frog" for w in wrong)
    worst = sorted(ranking, key=lambda r: -r["label_score"])[:len(wrong) + 2]
    assert set(wrong) <= {r["id"] for r in worst}  # the planted images lead the label review
    assert len(suspects) <= 10  # the rest of the 123 mostly agree with their neighbours
    assert all(r["suggested_label"] is None for r in ranking if not r["suspect"])

    kept = pq.read_table(out / "kept")["id"].to_pylist()
    dropped = pq.read_table(out / "dropped").to_pylist()
    assert sorted(kept + [r["id"] for r in dropped]) == every
    assert sorted(r["id"] for r in dropped if r["reason"] == "label") == sorted(suspects)
    report = (out / "report.html").read_text()
    suspects_section = report.split('id="suspects"')[1].split("Run record")[0]
    assert all(f"{w}: filed automobile, suggested frog" in suspects_section for w in wrong)
    assert suspects_section.count("data:image/png;base64,") >= 2 * len(wrong)  # the suspect beside its voters
    record = json.loads((out / "run.json").read_text())
    assert record["labels"] == {"enabled": True, "column": "dir:1", "labelled_rows": 123, "unlabelled_rows": 0,
                                "labels": 2, "alone_in_their_label": [], "suspects": len(suspects),
                                "dropped": len(suspects)}


@pytest.mark.ray
def test_a_parquet_label_column_of_integers_with_a_label_of_one_image(ray_local, tmp_path):
    t = pa.concat_tables([cifar_rows("train", 1, 20), cifar_rows("train", 7, 20), cifar_rows("train", 3, 1)])
    t = pa.table({"id": pa.array(range(t.num_rows)), "image": t["image"], "class": t["label"]})
    pq.write_table(t, tmp_path / "data.parquet")
    out = tmp_path / "out"
    assert main(["rank", "--data", str(tmp_path / "data.parquet"), "--out", str(out), "--label-column", "class",
                 "--drop", "0.1", *LITE0]) == 0
    ranking = pq.read_table(out / "ranking").to_pylist()
    assert sorted(int(r["id"]) for r in ranking) == list(range(41))
    alone = next(r for r in ranking if r["label"] == "3")
    assert alone["score"] is None and alone["percentile"] is None and alone["neighbor_ids"] == []
    assert alone["rank"] == 41  # unscored rows rank last
    assert alone["label_agreement"] == 0.0 and alone["suspect"]  # no other 3 among its neighbours
    for label in ("1", "7"):
        mine = [r for r in ranking if r["label"] == label]
        assert max(r["percentile"] for r in mine) == 100.0  # percentiles within each label
    dropped = pq.read_table(out / "dropped").to_pylist()
    assert sorted(r["id"] for r in dropped) != [] and all(r["reason"] == "outlier" for r in dropped)
    by_label = {}
    for r in dropped:
        by_label.setdefault(next(x["label"] for x in ranking if x["id"] == r["id"]), []).append(r)
    assert {k: len(v) for k, v in by_label.items()} == {"1": 2, "7": 2}  # ceil(10 % of 20) of each label
    record = json.loads((out / "run.json").read_text())
    assert record["labels"]["alone_in_their_label"] == ["3"] and record["labels"]["dropped"] == 0


@pytest.mark.unit
@pytest.mark.parametrize("flags, msg", [
    (["--drop-suspects"], "--drop-suspects needs --label-column"),
    (["--label-column", "dir:0"], "--label-column dir:N needs a folder level"),
    (["--label-column", "class", "--reduce", "kmeans:8"], "--reduce replaces"),
])
def test_label_flags_refused_with_a_reason(flags, msg):
    from dnnad.cli import config_from_args, parser
    from dnnad.config import ConfigError

    with pytest.raises(ConfigError, match=msg):
        config_from_args(parser().parse_args(["rank", "--data", "d", "--out", "o", *flags])).validate()


@pytest.mark.unit
def test_a_label_column_the_source_cannot_give_is_refused_before_any_work(tmp_path):
    from dnnad.config import ConfigError, SourceConfig
    from dnnad.sources import prepare_source

    pq.write_table(pa.table({"id": ["a", "b"], "image": pa.array([b"x", b"y"], pa.binary())}), tmp_path / "d.parquet")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jpg").write_bytes(b"x")
    for uri, label, msg in ((tmp_path / "d.parquet", "class", "--label-column column 'class' not in"),
                            (tmp_path / "d.parquet", "dir:1", "dir:N is for folders"),
                            (tmp_path / "folder", "class", "for a folder must be dir:N")):
        with pytest.raises(ConfigError, match=msg):
            prepare_source(SourceConfig(str(uri), label_column=label), "data")


@pytest.mark.unit
def test_a_review_in_row_chunks_equals_one_over_every_row(monkeypatch):
    import dnnad.core.labels as labels_mod

    rng = np.random.default_rng(3)
    n, c = 50, 6
    labels = rng.choice(["a", "b", "c"], n)
    pos = np.where(rng.random((n, c)) < 0.9, rng.integers(0, n, (n, c)), -1)
    dist, own = np.sort(rng.random((n, c)), axis=1), np.where(rng.random(n) < 0.1, np.nan, rng.random(n))
    whole = review_labels(labels, pos, dist, own, k=2)
    monkeypatch.setattr(labels_mod, "REVIEW_ROWS", 7)
    chunked = review_labels(labels, pos, dist, own, k=2)
    for field in ("agreement", "margin", "score"):
        np.testing.assert_array_equal(getattr(whole, field), getattr(chunked, field))
    assert whole.suggested.tolist() == chunked.suggested.tolist() and whole.suspect.any()


@pytest.mark.unit
def test_the_ranking_streamed_in_slices_equals_the_ranking_in_one_piece():
    from dnnad.jobs.rank import LabelColumns, rank_tables

    rng = np.random.default_rng(5)
    n, c = 40, 4
    ids = np.array([f"img-{i}" for i in range(n)], dtype=object)
    scores = np.where(rng.random(n) < 0.1, np.nan, rng.random(n))
    nbr = rng.integers(0, n, (n, 2))
    labels = LabelColumns(np.array([None if i % 9 == 0 else f"L{i % 3}" for i in range(n)], dtype=object),
                          np.array([i % 9 != 0 for i in range(n)]), np.where(rng.random((n, c)) < 0.8,
                          rng.integers(0, n, (n, c)), -1), rng.random(n), rng.random(n),
                          np.array([None] * n, dtype=object), rng.random(n) < 0.2)
    errors = pa.table({"id": ["bad.png"], "error": ["cannot identify image file"]})
    args = (ids, scores, ids[nbr], rng.random((n, 2)), errors, labels)
    whole = pa.concat_tables(rank_tables(*args))
    sliced = list(rank_tables(*args, rows=7))
    assert len(sliced) == 7 and pa.concat_tables(sliced).equals(whole)  # six slices of ranked rows, the error rows
    assert whole["rank"].to_pylist()[:n] == list(range(1, n + 1)) and whole["status"].to_pylist()[-1] == "error"
    row = whole.slice(0, 1).to_pylist()[0]
    i = int(row["id"].split("-")[1])
    assert row["voter_ids"] == [ids[p] for p in labels.voter_pos[i] if p >= 0]


@pytest.mark.unit
def test_labels_ranked_in_one_process_equal_each_label_fitted_alone():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 6)).astype(np.float32)
    bounds = np.array([0, 1, 4, 25, 40])  # a label of one row, one smaller than k + 1, two ordinary ones
    params = FitParams(k=3)
    scores, dist, pos = rank_within_groups(X, bounds, params)
    assert np.isnan(scores[0]) and (pos[0] == -1).all()
    for a, b in zip(bounds[1:-1], bounds[2:]):
        alone = fit_reference(X[a:b], None, replace(params, k=min(3, b - a - 1)))
        k = alone.k
        np.testing.assert_allclose(scores[a:b], alone.calibration_scores)
        np.testing.assert_allclose(dist[a:b, :k], alone.calibration_dist)
        np.testing.assert_array_equal(pos[a:b, :k], a + alone.calibration_pos)
        assert np.isnan(dist[a:b, k:]).all() and (pos[a:b, k:] == -1).all()  # a label of 3 rows: k=2


@pytest.mark.unit
def test_excluding_copies_ranks_a_label_of_copies_as_nothing_and_clamps_k_to_the_rows_left():
    copies, other = np.ones((3, 4), np.float32), np.zeros((1, 4), np.float32)
    X = np.concatenate([copies, copies, other])  # label 1: three copies; label 2: three copies and one other
    params = FitParams(k=2, exclude_duplicates=True)
    with pytest.warns(UserWarning, match="using k=1"):  # a copy in label 2 has one row left: the other
        scores, dist, pos = rank_within_groups(X, np.array([0, 3, 7]), params)
    assert np.isnan(scores[:3]).all()  # three copies of one image: no other image to be ranked against
    assert np.isfinite(scores[3:]).all() and np.isnan(dist[3:, 1]).all()
    assert (pos[3:6, 0] == 6).all() and pos[6, 0] in (3, 4, 5)  # a copy's neighbour is never its own copy
    with pytest.raises(NoNeighbours, match="copies of one row"):  # a ValueError: one line through the jobs
        fit_reference(X[:3], None, params)


@pytest.mark.unit
def test_labels_differing_only_by_a_trailing_nul_stay_two_labels():
    names = np.array(["a", "a\x00", "a"], dtype=object)
    assert [(n, r.tolist()) for n, r in label_rows(names)] == [("a", [0, 2]), ("a\x00", [1])]
