"""Fault injection: killed workers are replaced, re-runs never duplicate, interrupted runs leave no results."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from dnnad.cli import main
from tests.helpers import read_scores

pytestmark = pytest.mark.ray

SLOW = ["--backbone", "resnet18", "--weights", "none", "--image-size", "160", "--batch-size", "4",
        "--score-batch-size", "4", "--quiet"]


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
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # it finished first: look for the next one
                    break
                killed.append(proc.pid)
                break
        time.sleep(0.05)
    return killed


@pytest.fixture(scope="module")
def undisturbed(ray_local, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "clean"
    assert main(["score", "--normal", str(corpus.normal), "--query", str(corpus.query),
                 "--out", str(out), *SLOW]) == 0
    return out


@pytest.mark.parametrize("actor", ["MapWorker(MapBatches(Embedder))", "MapWorker(MapBatches(KnnScorer))"])
def test_killed_actor_is_replaced_and_output_is_identical(undisturbed, corpus, tmp_path, actor):
    out = tmp_path / "killed"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=lambda: killed.extend(kill_first_actor(actor, stop, 0.2)))
    killer.start()
    try:
        rc = main(["score", "--model", str(undisturbed / "model"), "--query", str(corpus.query),
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
    stale.mkdir(parents=True)  # what a run killed mid-write leaves behind: its owner is a dead process
    (stale / "part-0.parquet").write_bytes(b"half a file")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".staging-deadbeef" / "owner.json").write_text(json.dumps(
        {"host": os.uname().nodename, "pid": dead.pid, "proc_start": "0", "started": "earlier"}))
    (out / ".staging-unknown").mkdir()  # no owner file: not provably dnnad's, so never deleted
    assert not (out / "run.json").exists() and not (out / "scores").exists()  # readers see no result
    assert main(["score", "--model", str(undisturbed / "model"), "--query", str(corpus.query),
                 "--out", str(out), *SLOW]) == 0
    t = pq.read_table(out / "scores")
    assert t.num_rows == 203 and len(set(t["id"].to_pylist())) == 203
    assert [p.name for p in out.iterdir() if p.name.startswith(".staging-")] == [".staging-unknown"]


def test_every_kind_of_bad_input_is_an_error_row_or_converted(ray_local, corpus, tmp_path):
    import numpy as np
    from PIL import Image

    from tests.helpers import make_corpus, png_bytes
    from tests.test_decode import declared_size_png, jpeg_bytes

    zoo = make_corpus(tmp_path / "zoo", query=100)
    data = zoo.query
    good_jpeg = (data / zoo.good[0]).read_bytes()
    bad = {
        "bad/truncated.jpg": (good_jpeg[:200], "truncated or corrupt"),
        "bad/truncated.png": (png_bytes(Image.new("RGB", (64, 64), "red"))[:80], "truncated or corrupt"),
        "bad/zero.jpg": (b"", "empty file (0 bytes)"),
        "bad/notes.png": (b"meeting notes, not a picture", "not an image"),
        "bad/bomb.png": (declared_size_png(20000, 20000), "decompression bomb guard"),
    }
    converted = {
        "odd/one-pixel.png": png_bytes(Image.new("RGB", (1, 1), "white")),
        "odd/sixteen-bit.png": png_bytes(Image.fromarray(np.full((20, 20), 30000, dtype=np.uint16))),
        "odd/cmyk.jpg": jpeg_bytes(Image.new("CMYK", (20, 20), (0, 255, 0, 0))),
        "odd/palette.png": png_bytes(Image.new("P", (20, 20))),
        "odd/rgba.png": png_bytes(Image.new("RGBA", (20, 20), (9, 9, 9, 100))),
    }
    for name, content in [*((n, b) for n, (b, _) in bad.items()), *converted.items()]:
        (data / name).parent.mkdir(exist_ok=True)
        (data / name).write_bytes(content)
    (data / "bad" / "dangling.jpg").symlink_to(tmp_path / "deleted-long-ago.jpg")
    bad["bad/dangling.jpg"] = (None, "file not found")
    out = tmp_path / "out"
    assert main(["score", "--normal", str(corpus.normal), "--query", str(data), "--out", str(out), *SLOW]) == 0
    rows = {r["id"]: r for r in pq.read_table(out / "scores").to_pylist()}
    assert len(rows) == 100 + len(bad) + len(converted)
    for name, (_, reason) in bad.items():
        assert rows[name]["status"] == "error" and reason in rows[name]["error"], (name, rows[name]["error"])
    for name in converted:
        assert rows[name]["status"] == "ok" and rows[name]["score"] > 0
