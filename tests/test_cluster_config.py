"""cluster.yaml passes the Ray cluster launcher's own schema validation."""
import json
import os

import pytest
import yaml

from tests.helpers import ROOT

pytestmark = pytest.mark.unit


def test_cluster_yaml_is_valid_for_ray_up():
    import jsonschema
    import ray.autoscaler

    with open(ROOT / "cluster.yaml") as f:
        config = yaml.safe_load(f)
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)  # the schema `ray up` validates against
    jsonschema.validate(config, schema)  # raises on unknown keys or wrong types
    assert set(config["available_node_types"]) == {"head", "gpu_worker"} and config["head_node_type"] == "head"
    assert config["provider"]["type"] == "aws"
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["max_workers"] > workers["min_workers"] == 0  # autoscaling GPU workers
    assert any("dnnad[gpu]" in c for c in config["setup_commands"])
