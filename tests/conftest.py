"""Fixtures: one real local Ray per session, real image folders on disk. Helpers live in tests/helpers.py.

Tiers: every test says which one it belongs to, with a module-level ``pytestmark`` or its own mark:

- ``unit``: no Ray, no job, no server; ``pytest -m unit`` runs them alone in well under a minute;
- ``ray``: a real local Ray, a job run as its own process, a cluster or an S3 server; ``slow`` marks the longest
  of them (``pytest -m "ray and not slow"`` leaves those out);
- ``gpu``: needs CUDA (skipped elsewhere).

Collection fails on a test without a tier, with both ``unit`` and ``ray``, with ``slow`` but not ``ray``, or
marked ``unit`` while it asks for a Ray fixture; a ``unit`` test fails if it initialised Ray or left a child
process running. Unit tests run first, so that no Ray started by a ray test is up while they run.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pyarrow.fs as pafs
import pytest

from tests.helpers import make_corpus

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The ONNX exports the jobs cache (vision.runtimes): in this session's own folder, not the user's ~/.cache.
os.environ.setdefault("DNNAD_CACHE", os.path.join(tempfile.gettempdir(), f"dnnad-test-cache-{os.getuid()}"))
# Credentials of the local S3 server (tests/test_object_store.py), set before Ray starts so that its workers
# (which write the outputs) have them too, as a cluster's workers have their own.
for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                   ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(key, value)

TIERS = ("unit", "ray", "gpu")
RAY_FIXTURES = {"ray_local", "s3"}  # a unit test may not ask for these, directly or through another fixture


def tier_problem(item: pytest.Item) -> str | None:
    marks = {m.name for m in item.iter_markers()}
    if not marks & set(TIERS):
        return "has no tier marker (unit, ray or gpu)"
    if {"unit", "ray"} <= marks:
        return "is marked both unit and ray"
    if "slow" in marks and "ray" not in marks:
        return "is marked slow but not ray (slow is a kind of ray test)"
    needs = RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
    if "unit" in marks and needs:
        return f"is marked unit but uses {', '.join(sorted(needs))} (mark it ray)"
    return None


def pytest_collection_modifyitems(config, items):
    """Check every test's tier (never infer it), then run the unit tests first."""
    problems = [f"{item.nodeid} {why}" for item in items if (why := tier_problem(item))]
    if problems:
        raise pytest.UsageError("tests with a wrong tier marker:\n  " + "\n  ".join(problems))
    items.sort(key=lambda item: item.get_closest_marker("unit") is None)  # stable: files keep their order


def ray_is_initialized() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def live_children() -> set[int]:
    """This process's descendants still running (a child that exited, reaped or not, does not count)."""
    alive = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(autouse=True)
def unit_tier_guard(request):
    """A unit test may not start Ray nor leave a process behind; it runs with one thread (torch, FAISS and BLAS
    alike), as small inputs do not gain from more and a busy 2-core machine loses badly to spinning threads."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    ray_before, before = ray_is_initialized(), live_children()
    with threadpool_limits(limits=1):
        if torch:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if torch:
                torch.set_num_threads(threads)
    problems = []
    if ray_is_initialized() and not ray_before:
        problems.append("initialised Ray")
    left = live_children() - before
    if left:
        names = []
        for pid in sorted(left):
            try:
                names.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:120]}")
            except psutil.NoSuchProcess:
                names.append(str(pid))
        problems.append(f"left child processes running: {names}")
    if problems:
        pytest.fail(f"unit test {request.node.nodeid} " + " and ".join(problems) + " (mark it ray)", pytrace=False)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, ended as the jobs end theirs (``runtime.stop_ray``): its processes carry
    an owner token, and any still starting when Ray shuts down (a plain ``ray.shutdown()`` left one scoring
    actor's worker running after CI once) are waited for, then killed."""
    import ray

    from dnnad import runtime

    token = os.environ[runtime.OWNER_ENV] = f"tests-{os.getpid()}-{time.time_ns()}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    del os.environ[runtime.OWNER_ENV]  # Ray's processes have it; the tests' own subprocesses (clusters, jobs) do not
    yield ray
    os.environ[runtime.OWNER_ENV] = token
    runtime.stop_ray()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A normal folder (120 automobiles) and a query folder (200 test images + 3 corrupt files)."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), normal=120, query=200,
                       bad=["corrupt/truncated.jpg", "corrupt/text.png", "corrupt/empty.jpg"])


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
