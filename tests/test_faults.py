"""Fault injection: killed workers are replaced, re-runs never duplicate, interrupted runs leave no results."""
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from dnnad.cli import main
from tests.conftest import read_scores

SLOW = ["--backbone", "resnet18", "--weights", "none", "--image-size", "160", "--batch-size", "4", "--quiet"]


def kill_first_actor(class_name: str, stop: threading.Event, delay_s: float) -> list[int]:
    """SIGKILL the worker process of the first actor of ``class_name`` once it has worked ``delay_s``.

    Ray titles an actor's process ``ray::<class name>...``; that is how the test finds it.
    """
    import psutil

    killed = []
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith(f"ray::{class_name}"):
                time.sleep(delay_s)
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                break
        time.sleep(0.05)
    return killed


@pytest.fixture(scope="module")
def undisturbed(ray_local, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "clean"
    assert main(["score", "--normal", str(corpus["normal"]), "--query", str(corpus["query"]),
                 "--out", str(out), *SLOW]) == 0
    return out


@pytest.mark.parametrize("actor", ["MapWorker(MapBatches(Embedder))", "MapWorker(MapBatches(KnnScorer))"])
def test_killed_actor_is_replaced_and_output_is_identical(undisturbed, corpus, tmp_path, actor):
    out = tmp_path / "killed"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=lambda: killed.extend(kill_first_actor(actor, stop, 0.5)))
    killer.start()
    try:
        rc = main(["score", "--model", str(undisturbed / "model"), "--query", str(corpus["query"]),
                   "--out", str(out), *SLOW])
    finally:
        stop.set()
        killer.join()
    assert rc == 0 and killed, "the actor was never killed: the test did not test anything"
    a, b = read_scores(undisturbed), read_scores(out)
    assert a.select(["id", "score", "neighbor_ids", "status", "error"]).equals(
        b.select(["id", "score", "neighbor_ids", "status", "error"]))


def test_interrupted_run_leaves_no_results_and_rerun_completes_once(undisturbed, corpus, tmp_path):
    out = tmp_path / "crash"
    out.mkdir()
    stale = out / ".staging-deadbeef" / "scores"
    stale.mkdir(parents=True)  # what a run killed mid-write leaves behind
    (stale / "part-0.parquet").write_bytes(b"half a file")
    assert not (out / "run.json").exists() and not (out / "scores").exists()  # readers see no result
    assert main(["score", "--model", str(undisturbed / "model"), "--query", str(corpus["query"]),
                 "--out", str(out), *SLOW]) == 0
    t = pq.read_table(out / "scores")
    assert t.num_rows == 203 and len(set(t["id"].to_pylist())) == 203
    assert not any(p.name.startswith(".staging-") for p in out.iterdir())
