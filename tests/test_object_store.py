"""Outputs and models on an object store: a real S3 API served locally (moto's server mode), written through
pyarrow's S3FileSystem; run.json is the commit marker and nothing dnnad did not write is replaced."""
import json
import socket
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from dnnad.cli import main
from tests.helpers import FAST, cifar_rows, write_folder

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port (this test's own process, stopped by pid) and a bucket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               access_key="testing", secret_key="testing", allow_bucket_creation=True)
        deadline = time.time() + 30
        while True:
            try:
                fs.create_dir("bucket")
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield fs, f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-data")
    write_folder(root / "normal", cifar_rows("train", 1, 20))
    write_folder(root / "query", cifar_rows("test", None, 30))
    (root / "query" / "broken.png").write_bytes(b"not a png")
    return root


def test_score_into_s3_then_reuse_the_model_from_s3(ray_local, s3, folders):
    fs, opts = s3
    out = f"s3://bucket/runs/first{opts}"
    args = ["score", "--normal", str(folders / "normal"), "--query", str(folders / "query"), "--out", out, *FAST]
    assert main(args) == 0
    record = json.loads(fs.open_input_stream("bucket/runs/first/run.json").read())
    assert record["format"] == "dnnad-run" and set(record["written"]) == {"scores", "report.html", "model"}
    scores = pq.read_table("bucket/runs/first/scores", filesystem=fs)
    assert scores.num_rows == 31 and scores.filter(pc.equal(scores["status"], "error")).num_rows == 1
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector("bucket/runs/first"))}
    assert names == {"scores", "report.html", "model", "run.json"}  # no in-progress marker left
    assert main(args) == 2  # a finished run needs --overwrite

    again = f"s3://bucket/runs/second{opts}"
    assert main(["score", "--model", f"s3://bucket/runs/first/model{opts}", "--query", str(folders / "query"),
                 "--out", again, *FAST]) == 0
    second = pq.read_table("bucket/runs/second/scores", filesystem=fs)
    assert second.sort_by("id")["score"].to_pylist() == scores.sort_by("id")["score"].to_pylist()


def test_user_objects_are_never_replaced_and_a_dead_runs_leftovers_are(ray_local, s3, folders):
    fs, opts = s3
    with fs.open_output_stream("bucket/mine/scores/data.parquet") as f:
        f.write(b"the user's own table")
    args = ["score", "--normal", str(folders / "normal"), "--query", str(folders / "query"), *FAST]
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
