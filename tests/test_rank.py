"""Unsupervised setting: rank a set against itself, drop the worst, refit; kept and dropped partition it."""
import json
import shutil

import pyarrow.parquet as pq
import pytest

from dnnad.cli import main
from tests.helpers import FAST, damaged, make_corpus

pytestmark = pytest.mark.ray


def test_rank_drop_refit_partitions_the_input(ray_local, tmp_path):
    data = make_corpus(tmp_path, normal=80).normal
    files = sorted(p.name for p in data.iterdir())
    for name in files[:3]:  # exact duplicate images under other names
        shutil.copy(data / name, data / f"dup-{name}")
    (data / "broken.png").write_bytes(damaged("broken.png", b""))
    out = tmp_path / "out"
    assert main(["rank", "--data", str(data), "--out", str(out), "--drop", "0.05", "--rounds", "2", *FAST]) == 0

    ranking = pq.read_table(out / "ranking").to_pylist()
    every = sorted(p.name for p in data.iterdir())
    assert sorted(r["id"] for r in ranking) == every
    ok = [r for r in ranking if r["status"] == "ok"]
    assert sorted(r["rank"] for r in ok) == list(range(1, len(ok) + 1))
    assert all(a["score"] >= b["score"] for a, b in zip(ok, ok[1:]))
    assert ok[0]["percentile"] == 100.0
    assert all(r["id"] not in r["neighbor_ids"] for r in ok)  # never its own neighbour
    dup = next(r for r in ok if r["id"] == f"dup-{files[0]}")
    assert dup["neighbor_ids"][0] == files[0] and dup["neighbor_dists"][0] == 0.0
    assert [r["error"] for r in ranking if r["status"] == "error"] == ["not an image: unrecognised format"]

    kept = pq.read_table(out / "kept")["id"].to_pylist()
    dropped = pq.read_table(out / "dropped").to_pylist()
    dropped_ids = [r["id"] for r in dropped]
    assert sorted(kept + dropped_ids) == every and not set(kept) & set(dropped_ids)
    record = json.loads((out / "run.json").read_text())
    assert [r["dropped"] for r in record["rounds"]] == [5, 4]  # ceil(5% of 83), ceil(5% of 78)
    assert {r["reason"] for r in dropped} == {"outlier", "error"}
    assert record["model"]["n_normal"] == len(kept)


def test_exclude_duplicates_keeps_copies_out_of_each_others_neighbours(ray_local, tmp_path):
    data = make_corpus(tmp_path, normal=30).normal
    first = sorted(p.name for p in data.iterdir())[0]
    shutil.copy(data / first, data / f"dup-{first}")
    out = tmp_path / "out"
    assert main(["rank", "--data", str(data), "--out", str(out), "--exclude-duplicates", *FAST]) == 0
    rows = {r["id"]: r for r in pq.read_table(out / "ranking").to_pylist()}
    assert f"dup-{first}" not in rows[first]["neighbor_ids"] and min(rows[first]["neighbor_dists"]) > 0


PRETRAINED = ["--weights", "imagenet", "--quiet"]  # the default backbone (Lite2): what the threshold was measured on


def plant_copies(data) -> dict[str, str]:
    """Copies of the first four images (exact, JPEG re-encode, 2x resize, flip); copy name → original."""
    from PIL import Image

    files = sorted(p.name for p in data.iterdir())
    img = lambda name: Image.open(data / name).convert("RGB")  # noqa: E731
    shutil.copy(data / files[0], data / "z-exact.jpg")
    img(files[1]).save(data / "z-reencoded.jpg", quality=90)
    img(files[2]).resize((64, 64), Image.BICUBIC).save(data / "z-resized.png")
    img(files[3]).transpose(Image.FLIP_LEFT_RIGHT).save(data / "z-flipped.png")
    return {"z-exact.jpg": files[0], "z-reencoded.jpg": files[1], "z-resized.png": files[2],
            "z-flipped.png": files[3]}


def test_rank_groups_and_drops_planted_near_duplicates(ray_local, tmp_path):
    data = make_corpus(tmp_path, normal=30, label=3).normal
    copies = plant_copies(data)
    (data / "broken.png").write_bytes(damaged("broken.png", b""))
    out = tmp_path / "out"
    assert main(["rank", "--data", str(data), "--out", str(out), "--drop-duplicates", "--drop", "0.05",
                 *PRETRAINED]) == 0

    dups = pq.read_table(out / "duplicates").to_pylist()
    groups = {}
    for r in dups:
        groups.setdefault(r["group_id"], []).append(r)
    assert sorted(groups) == list(range(4))
    assert sorted([m["id"] for m in g] for g in groups.values()) == sorted([o, c] for c, o in copies.items())
    for g in groups.values():  # the original sorts first: it is the group's first member, at distance 0
        assert g[0]["distance"] == 0.0 and 0.0 <= g[1]["distance"] and all(m["group_size"] == 2 for m in g)
    exact = next(g for g in groups.values() if g[1]["id"] == "z-exact.jpg")
    assert exact[1]["distance"] == 0.0

    every = sorted(p.name for p in data.iterdir())
    kept = pq.read_table(out / "kept")["id"].to_pylist()
    dropped = pq.read_table(out / "dropped").to_pylist()
    assert sorted(kept + [r["id"] for r in dropped]) == every and len(kept) + len(dropped) == len(every)
    assert sorted(r["id"] for r in dropped if r["reason"] == "duplicate") == sorted(copies)
    assert [r["id"] for r in dropped if r["reason"] == "error"] == ["broken.png"]
    assert sum(r["reason"] == "outlier" for r in dropped) == 2  # ceil(5 % of the 30 distinct images)
    assert set(copies.values()) - {r["id"] for r in dropped} <= set(kept)
    record = json.loads((out / "run.json").read_text())
    rank = record["config"]["rank"]
    assert record["duplicates"] == {"enabled": True, "ratio": rank["duplicate_ratio"],
                                    "similarity": rank["duplicate_similarity"], "verified_by": "fingerprints",
                                    "candidates": {"embedding_neighbours": 10, "fingerprint_neighbours": 10},
                                    "groups": 4, "rows_in_groups": 8, "largest_group": 2, "dropped": 4}
    assert record["rounds"][0]["duplicates_dropped"] == 4 and record["rounds"][0]["dropped"] == 6
    shown = (out / "report.html").read_text().split('id="duplicates"')[1].split('id="suspects"')[0]
    assert shown.count("images</span>") == 4 and shown.count("data:image/png;base64,") == 8  # pairs side by side
    assert all(c in shown and o in shown for c, o in copies.items())
    assert record["model"]["n_normal"] == len(kept) == 28
    ranking = pq.read_table(out / "ranking")
    assert sorted(ranking["id"].to_pylist()) == every  # the ranking still has every row


def test_rank_without_duplicates_groups_nothing_and_drops_nothing(ray_local, tmp_path):
    data = make_corpus(tmp_path, normal=30, label=3, normal_offset=100).normal
    out = tmp_path / "out"
    assert main(["rank", "--data", str(data), "--out", str(out), "--drop-duplicates", *PRETRAINED]) == 0
    assert pq.read_table(out / "duplicates").num_rows == 0
    every = sorted(p.name for p in data.iterdir())
    assert sorted(pq.read_table(out / "kept")["id"].to_pylist()) == every
    assert pq.read_table(out / "dropped").num_rows == 0
    record = json.loads((out / "run.json").read_text())
    assert record["duplicates"]["groups"] == 0 and record["duplicates"]["dropped"] == 0
    assert record["kept"] == 30 and record["dropped"] == 0
    assert record["warnings"] == []


def test_many_blank_frames_group_together_and_are_reported(ray_local, tmp_path):
    """Twelve copies of one blank frame among thirty photos: each copy's neighbours are other copies at distance 0,
    they form one duplicate group, and the run record warns that one vector stands for 12 of 42 images."""
    from PIL import Image

    data = make_corpus(tmp_path, normal=30).normal
    for i in range(12):
        Image.new("RGB", (32, 32), (128, 128, 128)).save(data / f"blank-{i:02d}.png")
    out = tmp_path / "out"
    assert main(["rank", "--data", str(data), "--out", str(out), *FAST]) == 0
    rows = {r["id"]: r for r in pq.read_table(out / "ranking").to_pylist()}
    assert len(rows) == 42
    assert rows["blank-05.png"]["neighbor_ids"] == ["blank-00.png", "blank-01.png"]
    assert rows["blank-05.png"]["neighbor_dists"] == [0.0, 0.0]
    groups = pq.read_table(out / "duplicates").to_pylist()
    assert sorted(r["id"] for r in groups if r["id"].startswith("blank")) == [f"blank-{i:02d}.png" for i in range(12)]
    record = json.loads((out / "run.json").read_text())
    assert len(record["warnings"]) == 1 and record["warnings"][0].startswith("12 of 42 normal rows (28.6%)")
