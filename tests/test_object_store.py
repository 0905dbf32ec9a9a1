"""Outputs and models on an object store: a real S3 API served locally (moto's server mode), written through
pyarrow's S3FileSystem; run.json is the commit marker and nothing dnnad did not write is replaced."""
import json
import socket
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from dnnad.cli import main
from tests.helpers import FAST, RESUMABLE, ROOT, kill_once, make_corpus

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("s3-data"), normal=20, query=30, bad=["broken.png"])


def test_score_into_s3_then_reuse_the_model_from_s3(ray_local, s3, folders):
    fs, opts = s3
    out = f"s3://bucket/runs/first{opts}"
    args = ["score", "--normal", str(folders.normal), "--query", str(folders.query), "--out", out, *FAST]
    assert main(args) == 0
    record = json.loads(fs.open_input_stream("bucket/runs/first/run.json").read())
    assert record["format"] == "dnnad-run" and set(record["written"]) == {"scores", "report.html", "model"}
    scores = pq.read_table("bucket/runs/first/scores", filesystem=fs)
    assert scores.num_rows == 31 and scores.filter(pc.equal(scores["status"], "error")).num_rows == 1
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector("bucket/runs/first"))}
    assert names == {"scores", "report.html", "model", "run.json"}  # no in-progress marker left
    assert main(args) == 2  # a finished run needs --overwrite

    again = f"s3://bucket/runs/second{opts}"
    assert main(["score", "--model", f"s3://bucket/runs/first/model{opts}", "--query", str(folders.query),
                 "--out", again, *FAST]) == 0
    second = pq.read_table("bucket/runs/second/scores", filesystem=fs)
    assert second.sort_by("id")["score"].to_pylist() == scores.sort_by("id")["score"].to_pylist()


def test_user_objects_are_never_replaced_and_a_dead_runs_leftovers_are(ray_local, s3, folders):
    fs, opts = s3
    with fs.open_output_stream("bucket/mine/scores/data.parquet") as f:
        f.write(b"the user's own table")
    args = ["score", "--normal", str(folders.normal), "--query", str(folders.query), *FAST]
    assert main([*args, "--out", f"s3://bucket/mine{opts}", "--overwrite"]) == 2
    assert fs.open_input_stream("bucket/mine/scores/data.parquet").read() == b"the user's own table"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with fs.open_output_stream("bucket/killed/.dnnad-in-progress.json") as f:
        f.write(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "proc_start": "0",
                            "outputs": ["scores", "report.html", "model"]}).encode())
    with fs.open_output_stream("bucket/killed/scores/half.parquet") as f:
        f.write(b"half a file")
    assert main([*args, "--out", f"s3://bucket/killed{opts}"]) == 0
    t = pq.read_table("bucket/killed/scores", filesystem=fs)
    assert t.num_rows == 31
    assert fs.get_file_info("bucket/killed/.dnnad-in-progress.json").type == pafs.FileType.NotFound


@pytest.mark.slow
def test_killed_run_into_s3_resumes_from_its_committed_partitions(s3, tmp_path):
    """No rename on S3: the run writes in place under its in-progress file; killed and run again with the same
    command, it keeps the partitions it committed and writes the rest, every row once."""
    fs, opts = s3
    c = make_corpus(tmp_path, normal=30, query=200)
    cmd = [sys.executable, "jobs/score.py", "--normal", str(c.normal), "--query", str(c.query),
           "--out", f"s3://bucket/runs/resumed{opts}", *RESUMABLE]
    marker = "bucket/runs/resumed/scores/.part-00001.done"
    kill_once(cmd, lambda: fs.get_file_info(marker).type != pafs.FileType.NotFound)
    assert fs.get_file_info("bucket/runs/resumed/run.json").type == pafs.FileType.NotFound  # not committed

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(fs.open_input_stream("bucket/runs/resumed/run.json").read())
    assert record["partitions"] == 5 and record["partitions_resumed"] >= 2
    ids = pq.read_table("bucket/runs/resumed/scores", filesystem=fs)["id"].to_pylist()
    assert len(ids) == 200 and len(set(ids)) == 200
    left = [i.path for i in fs.get_file_info(pafs.FileSelector("bucket/runs/resumed", recursive=True))]
    assert not [p for p in left if p.endswith((".dnnad-in-progress.json", ".done"))]
