"""Many nodes: a real two-node Ray cluster on this machine, the job submitted with ``ray job submit`` (the
README's cluster commands, token auth included); embedding and scoring run on both nodes and the output
equals a single-node run."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dnnad.cli import main
from tests.helpers import FAST, RESUMABLE, ROOT, make_corpus

RAY = str(Path(sys.executable).parent / "ray")
JOB_ARGS = ["--actors", "2", "--threads", "1", "--score-actors", "2", "--score-batch-size", "16",
            "--batch-size", "16", *FAST]

pytestmark = pytest.mark.ray


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_args(ports: list[int], workers_from: int) -> list[str]:
    """Ports of one node's processes, so that two nodes (and the test session's own Ray) share one host."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    args = [x for name, port in zip(names, ports) for x in (name, str(port))]
    return [*args, "--min-worker-port", str(workers_from), "--max-worker-port", str(workers_from + 99),
            "--num-cpus", "2", "--object-store-memory", str(400 * 1024 * 1024), "--disable-usage-stats"]


def wait_for_nodes(address: str, n: int, env: dict, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "json"],
                             capture_output=True, text=True, env=env)
        try:
            nodes = json.loads(out.stdout) if out.returncode == 0 else []
        except ValueError:  # the dashboard is still starting
            nodes = []
        if sum(node["state"] == "ALIVE" for node in nodes) >= n:
            return
        time.sleep(2)
    raise TimeoutError(f"cluster did not reach {n} nodes")


@pytest.fixture(scope="module")
def cluster():
    """``ray start --head`` and ``ray start --address`` as this test's own processes (stopped by pid)."""
    gcs, dash, client, *rest = free_ports(3 + 2 * 6)
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
                             "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
                             "--ray-client-server-port", str(client), "--temp-dir", temp,
                             *node_args(rest[:6], 23100)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [head]
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_for_nodes(address, 1, env)
        worker = subprocess.Popen([RAY, "start", "--block", "--address", f"127.0.0.1:{gcs}", *node_args(rest[6:], 23300)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.insert(0, worker)
        wait_for_nodes(address, 2, env)
        yield address, env
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("cluster-data"), normal=40, query=120, bad=["broken.jpg"])


def submit_score(cluster, data, out, args: list[str]) -> None:
    """The score job over ``data`` through ``ray job submit`` on the two-node cluster; it must succeed."""
    address, env = cluster
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
              sys.executable, "jobs/score.py", "--normal", str(data.normal), "--query", str(data.query),
              "--out", str(out), *args]
    proc = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_ray_job_submit_runs_on_both_nodes_and_matches_a_single_node_run(cluster, data, tmp_path, ray_local):
    address, env = cluster
    out = tmp_path / "cluster-out"
    submit_score(cluster, data, out, JOB_ARGS)

    actors = json.loads(subprocess.run([RAY, "list", "actors", "--address", address, "--detail", "--format", "json",
                                        "--limit", "1000"], capture_output=True, text=True, env=env).stdout)
    for kind in ("Embedder", "KnnScorer"):
        nodes = {a["node_id"] for a in actors
                 if kind in (a.get("class_name", "") + a.get("repr_name", "")) and a.get("node_id")}
        assert len(nodes) == 2, (kind, nodes)

    single = tmp_path / "single-out"
    assert main(["score", "--normal", str(data.normal), "--query", str(data.query), "--out", str(single),
                 *JOB_ARGS]) == 0
    a, b = (pq.read_table(p / "scores").sort_by("id") for p in (out, single))
    assert a.num_rows == b.num_rows == 121 and a["id"].to_pylist() == b["id"].to_pylist()
    assert a["status"].to_pylist() == b["status"].to_pylist()
    np.testing.assert_array_equal(a["score"].to_numpy(zero_copy_only=False), b["score"].to_numpy(zero_copy_only=False))
    assert a["neighbor_ids"].to_pylist() == b["neighbor_ids"].to_pylist()
    assert json.loads((out / "run.json").read_text())["cluster"]["cpus"] == 4


def test_localize_through_ray_job_submit_gives_the_maps_of_one_node(cluster, data, tmp_path, ray_local):
    """Two nodes, the bank in two shard groups (no actor holds all of it): the maps of one node, one group."""
    args = [*JOB_ARGS, "--localize", "--coreset", "0.5", "--shards", "2"]
    out = tmp_path / "cluster-maps"
    submit_score(cluster, data, out, [*args, "--shard-groups", "2"])
    single = tmp_path / "single-maps"
    assert main(["score", "--normal", str(data.normal), "--query", str(data.query), "--out", str(single), *args]) == 0
    a, b = (pq.read_table(p / "scores").sort_by("id") for p in (out, single))
    assert a.num_rows == b.num_rows == 121 and a["id"].to_pylist() == b["id"].to_pylist()
    np.testing.assert_array_equal(a["score"].to_numpy(zero_copy_only=False), b["score"].to_numpy(zero_copy_only=False))
    assert a["anomaly_map"].to_pylist() == b["anomaly_map"].to_pylist()
    assert a["peak_x"].to_pylist() == b["peak_x"].to_pylist()
    assert sum(m is not None and len(m) > 0 for m in a["anomaly_map"].to_pylist()) == 120  # the broken file: none


@pytest.mark.slow
def test_corpus_larger_than_the_object_store_streams_into_s3(cluster, s3, tmp_path):
    """10^6 vectors (1.95 GiB of float32, 2.4x the two nodes' 800 MB of object store) scored through ``ray job
    submit`` into an S3 bucket: every row once. (The driver's peak memory on such a stream is a figure that
    ``benchmarks/scale.py --sizes 1000000 --s3 --s3-size 1000000`` reports, not something a test asserts.)"""
    import pyarrow as pa
    import pyarrow.compute as pc

    address, env = cluster
    fs, opts = s3
    rng = np.random.default_rng(0)
    dim, rows, chunk = 512, 1_000_000, 50_000

    def table(n: int, start: int, prefix: str) -> pa.Table:
        X = rng.standard_normal((n, dim), dtype=np.float32)
        return pa.table({"id": pa.array([f"{prefix}{i:07d}" for i in range(start, start + n)]),
                         "vec": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), dim)})

    pq.write_table(table(300, 0, "n"), tmp_path / "normal.parquet")
    with pq.ParquetWriter(tmp_path / "corpus.parquet", table(1, 0, "q").schema) as w:
        for start in range(0, rows, chunk):
            w.write_table(table(chunk, start, "q"))
    assert (tmp_path / "corpus.parquet").stat().st_size > 2.4 * 800 * 2**20
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
              sys.executable, "jobs/score.py", "--normal", str(tmp_path / "normal.parquet"),
              "--query", str(tmp_path / "corpus.parquet"), "--embedding-column", "vec",
              "--out", f"s3://bucket/corpus{opts}", "--quiet"]
    proc = subprocess.run(submit, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    record = json.loads(fs.open_input_stream("bucket/corpus/run.json").read())
    assert record["rows"] == {"ok": rows}
    ids = pq.read_table("bucket/corpus/scores", columns=["id"], filesystem=fs)["id"]
    assert len(ids) == rows and pc.count_distinct(ids).as_py() == rows


def test_ray_job_stop_ends_the_job_and_the_same_submission_resumes_every_row_once(cluster, data, tmp_path):
    """``ray job stop`` sends SIGTERM to the driver (then SIGKILL): nothing is committed, and submitting the same
    command again resumes from the partitions the stopped run committed."""
    address, env = cluster
    out = tmp_path / "stopped-out"
    cmd = [sys.executable, "jobs/score.py", "--normal", str(data.normal), "--query", str(data.query),
           "--out", str(out), *RESUMABLE]

    def submit(sid: str, wait: bool):
        return subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                               "--submission-id", sid, *([] if wait else ["--no-wait"]), "--", *cmd],
                              capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)

    assert submit("dnnad-stop-1", wait=False).returncode == 0
    deadline = time.time() + 600
    while not list(out.glob(".staging-*/scores/.part-00000.done")):
        assert time.time() < deadline, "no partition was committed"
        time.sleep(0.5)
    stop = subprocess.run([RAY, "job", "stop", "--address", address, "dnnad-stop-1"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = subprocess.run([RAY, "job", "status", "--address", address, "dnnad-stop-1"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert "was stopped" in status.stdout, status.stdout  # the job's status is STOPPED
    assert not (out / "run.json").exists()

    again = submit("dnnad-stop-2", wait=True)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    record = json.loads((out / "run.json").read_text())
    assert record["partitions_resumed"] >= 1
    ids = pq.read_table(out / "scores")["id"].to_pylist()
    assert len(ids) == 121 and len(set(ids)) == 121
