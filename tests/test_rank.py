"""Unsupervised setting: rank a set against itself, drop the worst, refit; kept and dropped partition it."""
import json
import shutil

import pyarrow.parquet as pq

from dnnad.cli import main
from tests.helpers import FAST, cifar_rows, write_folder


def test_rank_drop_refit_partitions_the_input(ray_local, tmp_path, corpus):
    data = tmp_path / "data"
    write_folder(data, cifar_rows("train", 1, 80))
    files = sorted(p.name for p in data.iterdir())
    for name in files[:3]:  # exact duplicate images under other names
        shutil.copy(data / name, data / f"dup-{name}")
    shutil.copy(corpus["query"] / "corrupt" / "text.png", data / "broken.png")
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
    data = tmp_path / "data"
    write_folder(data, cifar_rows("train", 1, 30))
    first = sorted(p.name for p in data.iterdir())[0]
    shutil.copy(data / first, data / f"dup-{first}")
    out = tmp_path / "out"
    assert main(["rank", "--data", str(data), "--out", str(out), "--exclude-duplicates", *FAST]) == 0
    rows = {r["id"]: r for r in pq.read_table(out / "ranking").to_pylist()}
    assert f"dup-{first}" not in rows[first]["neighbor_ids"] and min(rows[first]["neighbor_dists"]) > 0
