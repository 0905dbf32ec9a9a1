"""Fixtures: one real local Ray per session, real image folders on disk. Helpers live in tests/helpers.py.

Tiers: tests that need no Ray are marked ``unit`` (``pytest -m unit`` runs them alone in seconds); the
full suite (the README's test command) runs everything.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from tests.helpers import cifar_rows, write_folder

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Credentials of the local S3 server (tests/test_object_store.py), set before Ray starts so that its workers
# (which write the outputs) have them too, as a cluster's workers have their own.
for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                   ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(key, value)

RAY_FIXTURES = {"ray_local", "one_shard_run", "nights", "clean_rank", "s3"}


def pytest_collection_modifyitems(config, items):
    """Everything that starts Ray, a job or a subprocess is ``ray``; the rest is ``unit``."""
    for item in items:
        uses_ray = bool(RAY_FIXTURES & set(getattr(item, "fixturenames", ()))) or item.get_closest_marker("ray")
        item.add_marker(pytest.mark.ray if uses_ray else pytest.mark.unit)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A normal folder (120 automobiles) and a query folder (200 test images + 3 corrupt files)."""
    root = tmp_path_factory.mktemp("corpus")
    normal, query = root / "normal", root / "query"
    normal.mkdir(), query.mkdir()
    write_folder(normal, cifar_rows("train", 1, 120))
    good = write_folder(query, cifar_rows("test", None, 200))
    jpeg = (query / good[0]).read_bytes()
    (query / "corrupt" / "truncated.jpg").parent.mkdir()
    (query / "corrupt" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (query / "corrupt" / "text.png").write_text("this is not an image\n")
    (query / "corrupt" / "empty.jpg").write_bytes(b"")
    return {"normal": normal, "query": query, "good": good,
            "bad": ["corrupt/truncated.jpg", "corrupt/text.png", "corrupt/empty.jpg"]}


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
