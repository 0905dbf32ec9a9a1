"""Fixtures: one real local Ray per session, real image folders on disk. Helpers live in tests/helpers.py.

Tiers: tests that need no Ray are marked ``unit`` (``pytest -m unit`` runs them alone in seconds); the
full suite (the README's test command) runs everything.
"""
from __future__ import annotations

import os

import pytest

from tests.helpers import cifar_rows, write_folder

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Credentials of the local S3 server (tests/test_object_store.py), set before Ray starts so that its workers
# (which write the outputs) have them too, as a cluster's workers have their own.
for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                   ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(key, value)

RAY_FIXTURES = {"ray_local", "one_shard_run", "nights", "clean_rank"}


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
