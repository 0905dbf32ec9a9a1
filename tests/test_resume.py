"""Resume: a driver killed mid-run restarts from the partitions it committed, never with duplicate or
missing rows, and gives the same output as an undisturbed run."""
import glob
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.helpers import RESUMABLE as ARGS
from tests.helpers import ROOT, kill_once, make_corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # three job runs, one of them killed


def test_killed_driver_resumes_from_committed_partitions(tmp_path):
    c = make_corpus(tmp_path, normal=30, query=200)
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/score.py", "--normal", str(c.normal), "--query", str(c.query), "--out", str(out), *ARGS]
    kill_once(cmd, lambda: bool(glob.glob(str(out / ".staging-*" / "scores" / ".part-00001.done"))))
    assert not (out / "run.json").exists() and not (out / "scores").exists()  # readers see no result

    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    record = json.loads((out / "run.json").read_text())
    assert record["partitions"] == 5 and record["partitions_resumed"] >= 2
    t = pq.read_table(out / "scores")
    ids = t["id"].to_pylist()
    assert len(ids) == 200 and len(set(ids)) == 200

    clean = tmp_path / "clean"
    assert subprocess.run([*cmd[:-len(ARGS) - 2], "--out", str(clean), *ARGS], cwd=ROOT, capture_output=True,
                          timeout=600).returncode == 0
    a, b = t.sort_by("id"), pq.read_table(clean / "scores").sort_by("id")
    assert a["score"].to_pylist() == b["score"].to_pylist()
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]
