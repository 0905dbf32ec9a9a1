"""Trust: dnnad never deletes what it did not write, ordinary inputs run to the end, bad ones stop early
with one line, and no file that is not a regular file is ever opened."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dnnad.cli import main
from tests.helpers import FAST, ROOT, cifar_rows, make_corpus, read_scores, tree_digest


def user_dir(path: Path) -> Path:
    """A directory of a user's own files (what a typo in a path flag might name)."""
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work\n")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (path / "scores").mkdir()
    (path / "scores" / "mine.parquet").write_bytes(b"not dnnad's")
    return path


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI as its own process: all it prints, Ray's and the libraries' lines included."""
    return subprocess.run([sys.executable, "-m", "dnnad.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI's ``main`` in this process, for errors found before any work (a unit test may not start Ray:
    tests/conftest.py fails one that does, so these also show the error came before Ray)."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["dnnad", *args], rc, out, err)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dnnad: error: "), proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A clean folder of 12 normal and 10 query images."""
    return make_corpus(tmp_path_factory.mktemp("small"), normal=12, query=10)


# ---------------------------------------------------------------- nothing of the user's is deleted


@pytest.mark.unit
def test_model_flag_naming_a_user_directory_is_refused_and_it_survives(small, tmp_path, capsys):
    mine = user_dir(tmp_path / "data")
    before = tree_digest(mine)
    proc = run_main(capsys, "score", "--normal", str(small.normal), "--query", str(small.query),
                   "--out", str(tmp_path / "out"), "--model", str(mine), *FAST)
    one_line_error(proc, "--model", "holds no dnnad model")
    assert tree_digest(mine) == before and not (tmp_path / "out").exists()


@pytest.mark.unit
def test_out_holding_user_outputs_is_refused_even_with_overwrite(small, tmp_path, capsys):
    mine = user_dir(tmp_path / "out")
    before = tree_digest(mine)
    for extra in ([], ["--overwrite"]):
        proc = run_main(capsys, "score", "--normal", str(small.normal), "--query", str(small.query),
                       "--out", str(mine), *FAST, *extra)
        one_line_error(proc, "'scores'", "no finished dnnad run")
        assert tree_digest(mine) == before


@pytest.mark.ray
def test_overwrite_replaces_only_a_finished_run_and_keeps_user_files(ray_local, small, tmp_path):
    out = tmp_path / "out"
    args = ["score", "--normal", str(small.normal), "--query", str(small.query), "--out", str(out), *FAST]
    assert main(args) == 0
    (out / "notes.txt").write_text("my notes about this run\n")
    assert main(args) == 2  # a finished run needs --overwrite
    first = json.loads((out / "run.json").read_text())
    assert first["format"] == "dnnad-run" and set(first["written"]) == {"scores", "report.html", "model"}
    assert main([*args, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "my notes about this run\n"
    assert read_scores(out).num_rows == 10


@pytest.mark.ray
def test_a_live_runs_staging_is_never_touched_and_a_dead_runs_is_cleaned(ray_local, small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stat = Path(f"/proc/{live.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        (out / ".staging-live").mkdir()
        (out / ".staging-live" / "owner.json").write_text(json.dumps(
            {"host": os.uname().nodename, "pid": live.pid, "proc_start": stat, "started": "now"}))
        (out / ".staging-live" / "half.parquet").write_bytes(b"in progress")
        args = ["score", "--normal", str(small.normal), "--query", str(small.query), "--out", str(out), *FAST]
        assert main(args) == 2
        assert (out / ".staging-live" / "half.parquet").read_bytes() == b"in progress"
    finally:
        live.kill()
        live.wait()
    assert main(args) == 0  # the owner is dead now: its staging is cleaned, the run goes through
    assert not (out / ".staging-live").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".staging")] == []


@pytest.mark.ray
def test_cache_flag_naming_a_user_directory_is_refused(ray_local, small, tmp_path):
    model = tmp_path / "model"
    assert main(["score", "--normal", str(small.normal), "--query", str(small.query),
                 "--out", str(tmp_path / "fit"), "--model", str(model), *FAST]) == 0
    mine = user_dir(tmp_path / "cache")
    before = tree_digest(mine)
    assert main(["audit", "--model", str(model), "--query", str(small.query), "--out", str(tmp_path / "a"),
                 "--cache", str(mine), "--date", "2026-11-29", *FAST]) == 2
    assert tree_digest(mine) == before


# ---------------------------------------------------------------- ordinary inputs run to the end


@pytest.mark.ray
def test_rank_drop_on_a_clean_folder(ray_local, small, tmp_path):
    out = tmp_path / "rank"
    assert main(["rank", "--data", str(small.normal), "--out", str(out), "--drop", "0.2", *FAST]) == 0
    dropped = pq.read_table(out / "dropped")
    kept = pq.read_table(out / "kept")
    assert dropped.num_rows == 3 and set(dropped["reason"].to_pylist()) == {"outlier"}
    assert kept.num_rows + dropped.num_rows == 12


def parquet_table(rows: pa.Table, ids: list, labels: list | None = None) -> pa.Table:
    t = pa.table({"id": pa.array(ids), "image": rows["image"]})
    return t.append_column("label", pa.array(labels)) if labels is not None else t


@pytest.mark.ray
def test_integer_ids_and_string_labels_run_to_the_report(ray_local, tmp_path):
    normal = cifar_rows("train", 1, 12)
    query = pa.concat_tables([cifar_rows("test", 1, 4), cifar_rows("test", 3, 6)])
    pq.write_table(parquet_table(normal, list(range(12)), ["car"] * 12), tmp_path / "normal.parquet")
    labels = ["car" if v == 1 else "other" for v in query["label"].to_pylist()]
    pq.write_table(parquet_table(query, list(range(100, 110)), labels), tmp_path / "query.parquet")
    out = tmp_path / "out"
    assert main(["score", "--normal", str(tmp_path / "normal.parquet"), "--query", str(tmp_path / "query.parquet"),
                 "--out", str(out), *FAST]) == 0
    t = read_scores(out)
    assert t["id"].to_pylist() == [str(i) for i in range(100, 110)]
    assert t["label"].to_pylist() == labels  # carried unchanged
    assert all(n.isdigit() for ns in t["neighbor_ids"].to_pylist() for n in ns)
    assert "ROC AUC" in (out / "report.html").read_text()


@pytest.mark.ray
def test_null_ids_are_error_rows_and_duplicate_ids_are_refused(ray_local, tmp_path):
    rows = cifar_rows("test", None, 6)
    pq.write_table(parquet_table(rows, ["a", None, "c", "d", None, "f"]), tmp_path / "nulls.parquet")
    pq.write_table(parquet_table(rows, ["a", "b", "a", "d", "b", "f"]), tmp_path / "dups.parquet")
    normal = make_corpus(tmp_path, normal=5).normal
    out = tmp_path / "out"
    assert main(["score", "--normal", str(normal), "--query", str(tmp_path / "nulls.parquet"), "--out", str(out),
                 *FAST]) == 0
    t = pq.read_table(out / "scores")
    assert t.num_rows == 6
    nulls = [r for r in t.to_pylist() if r["id"] is None]
    assert len(nulls) == 2 and all(r["status"] == "error" and r["error"] == "null id" for r in nulls)
    assert "None" not in t["id"].to_pylist()
    proc = run_cli("score", "--normal", str(normal), "--query", str(tmp_path / "dups.parquet"),
                   "--out", str(tmp_path / "out2"), *FAST)
    one_line_error(proc, "duplicate ids", "'a'", "--id-column")


# ---------------------------------------------------------------- bad configuration: one line, before Ray


@pytest.fixture(scope="module")
def bad_inputs(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "fake.parquet").write_text("id,image\n1,abc\n")
    rows = cifar_rows("test", None, 3)
    pq.write_table(parquet_table(rows, ["a", "b", "c"]).slice(0, 0), root / "empty.parquet")
    pq.write_table(parquet_table(rows, ["a", "b", "c"], [1, 2, 3]), root / "three.parquet")
    make_corpus(root / "one", normal=1)
    return root


@pytest.mark.unit
@pytest.mark.parametrize("case, args, needles", [
    ("csv named .parquet", ["--normal", "{bad}/fake.parquet"], ["--normal", "Parquet"]),
    ("0-row Parquet", ["--query", "{bad}/empty.parquet"], ["--query", "selects no rows"]),
    ("filter selecting nothing", ["--query", "{bad}/three.parquet", "--query-filter", "label=9"],
     ["--query", "selects no rows", "label=9"]),
    ("group-by dir:x", ["--group-by", "dir:x"], ["--group-by"]),
    ("normal set of one image", ["--normal", "{bad}/one/normal"], ["at least 2"]),
    ("negative image size", ["--image-size", "-5"], ["--image-size"]),
    ("huge image size", ["--image-size", "100000"], ["--image-size"]),
    ("negative threads", ["--threads", "-1"], ["--threads"]),
    ("zero actors", ["--actors", "0"], ["--actors"]),
    ("zero batch", ["--score-batch-size", "0"], ["--score-batch-size"]),
])
def test_bad_configuration_is_one_line_before_any_work(small, bad_inputs, tmp_path, capsys, case, args, needles):
    """One line, nothing written, and (a unit test) Ray never started: no workers, no embedding."""
    base = {"--normal": str(small.normal), "--query": str(small.query)}
    given = [a.format(bad=bad_inputs) for a in args]
    for flag in ("--normal", "--query"):
        if flag not in given:
            given = [flag, base[flag], *given]
    proc = run_main(capsys, "score", *FAST, *given, "--out", str(tmp_path / "out"))
    one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- files that are not files


@pytest.mark.ray
def test_fifo_device_link_and_oversize_file_are_error_rows_not_hangs(ray_local, small, tmp_path):
    data = make_corpus(tmp_path, query=4).query
    os.mkfifo(data / "pipe.jpg")
    os.symlink("/dev/zero", data / "zero.png")
    (data / "big.jpg").write_bytes(b"\xff\xd8" + b"\0" * 300_000)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "jobs/score.py", "--normal", str(small.normal), "--query", str(data),
                           "--out", str(out), "--max-file-bytes", "200000", *FAST],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["id"]: r for r in pq.read_table(out / "scores").to_pylist()}
    assert len(rows) == 7
    assert rows["pipe.jpg"]["error"] == "not a regular file (a FIFO)"
    assert rows["zero.png"]["error"] == "not a regular file (a character device)"
    assert rows["big.jpg"]["error"].startswith("file too large")
    assert sum(r["status"] == "ok" for r in rows.values()) == 4


# ---------------------------------------------------------------- saved models


@pytest.fixture(scope="module")
def saved_model(ray_local, small, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    assert main(["score", "--normal", str(small.normal), "--query", str(small.query),
                 "--out", str(root / "fit"), "--model", str(root / "model"), *FAST]) == 0
    return root / "model"


@pytest.mark.ray
def test_flags_that_contradict_a_saved_model_are_errors(saved_model, small, tmp_path):
    proc = run_cli("score", "--model", str(saved_model), "--query", str(small.query), "--out",
                   str(tmp_path / "out"), "--k", "5", *FAST)
    one_line_error(proc, "--k", "saved model")
    proc = run_cli("score", "--model", str(saved_model), "--normal", str(small.normal), "--query",
                   str(small.query), "--out", str(tmp_path / "out"), *FAST)
    one_line_error(proc, "--normal", "saved model")


@pytest.mark.ray
@pytest.mark.parametrize("damage", ["k=0", "threshold=nan", "shard missing", "rows", "ids", "not json"])
def test_damaged_models_are_one_line_errors(saved_model, small, tmp_path, damage):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    doc = json.loads((model / "model.json").read_text())
    if damage == "k=0":
        doc["k"] = 0
    elif damage == "threshold=nan":
        doc["threshold"] = float("nan")
    elif damage == "shard missing":
        (model / "shard-000.npy").unlink()
    elif damage == "rows":
        np.save(model / "shard-000.npy", np.ones((3, doc["meta"]["dim"]), np.float32))
    elif damage == "ids":
        pq.write_table(pa.table({"id": ["x"]}), model / "normal.parquet")
    if damage == "not json":
        (model / "model.json").write_text('{"format": "dnnad-model", "version": 2, ')
    else:
        (model / "model.json").write_text(json.dumps(doc))
    proc = run_cli("score", "--model", str(model), "--query", str(small.query), "--out", str(tmp_path / "out"),
                   *FAST)
    one_line_error(proc, "--model")


# ---------------------------------------------------------------- reports


@pytest.mark.ray
def test_report_escapes_ids_and_reads_thumbnails_only_from_this_runs_sources(ray_local, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(cifar_rows("test", None, 1)["image"][0].as_py())
    normal = cifar_rows("train", 1, 6)
    hostile = ["<script>alert(1)</script>", str(secret), "../secret.png", "a&b", '"q"', "ok"]
    pq.write_table(parquet_table(normal, hostile), tmp_path / "normal.parquet")
    query = make_corpus(tmp_path, query=3).query
    out = tmp_path / "out"
    assert main(["score", "--normal", str(tmp_path / "normal.parquet"), "--query", str(query), "--out", str(out),
                 *FAST]) == 0
    html = (out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    # every thumbnail in the report is one of this run's images: 3 queries + their neighbours from the Parquet
    from dnnad.report.images import fetch_images

    got = fetch_images({"uri": str(query), "filters": []}, ["../secret.png", str(secret)])
    assert got == {}
