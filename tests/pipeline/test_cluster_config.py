"""Offline checks of cluster.yaml.

The config goes through the same steps `ray up` applies before it touches the cloud, taken from
``ray.autoscaler._private.commands._bootstrap_config``: ``prepare_config`` (merge with the AWS
``defaults.yaml``, fold ``setup_commands`` into the head/worker lists, fill per-type worker
limits) and then ``validate_config`` (``ray/autoscaler/ray-schema.json``, whose objects reject
unknown keys, plus the cross-field checks on node types). The two steps `ray up` runs in between
and after, ``fillout_available_node_types_resources`` and ``bootstrap_config``, call the EC2/IAM
APIs, so they are left out: nothing here contacts AWS.

On top of the schema, the test pins down what the docs promise: GPU workers scale from zero, the
head offers no GPU, the Ray pin matches pyproject.toml, workers have an instance profile for S3,
and the package is installed on every node.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
PYPROJECT = REPO / "pyproject.toml"

# `ray[default]==2.60.0`, `ray==2.60.0`, ... as written in a pip command.
RAY_PIN_IN_COMMAND = re.compile(r"(?<![\w.-])ray(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.+!-]*)")
# The same as a PEP 508 requirement string in pyproject.toml.
RAY_REQUIREMENT = re.compile(r"^\s*ray(?:\[[^\]]*\])?\s*==\s*([0-9][0-9A-Za-z.+!-]*)\s*$")

SETUP_KEYS = ("setup_commands", "head_setup_commands", "worker_setup_commands")


def ray_up_validate(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a cluster config the way `ray up` does, minus the AWS calls; return it prepared."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        config = yaml.safe_load(f)
    assert isinstance(config, dict), "cluster.yaml must be a mapping"
    return config


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    return ray_up_validate(raw)


def head_type(config: dict[str, Any]) -> dict[str, Any]:
    return config["available_node_types"][config["head_node_type"]]


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: spec
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: spec
        for name, spec in worker_types(config).items()
        if spec.get("resources", {}).get("GPU", 0) >= 1
    }


def all_setup_commands(config: dict[str, Any]) -> list[str]:
    commands: list[str] = []
    for key in SETUP_KEYS:
        commands += config.get(key) or []
    for spec in config["available_node_types"].values():
        commands += spec.get("worker_setup_commands") or []
    return commands


def pyproject_ray_pin() -> str:
    with PYPROJECT.open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = [m.group(1) for dep in dependencies if (m := RAY_REQUIREMENT.match(dep))]
    assert len(pins) == 1, f"expected exactly one `ray==X` pin in pyproject.toml, got {pins}"
    return pins[0]


# --- Ray's own validation -------------------------------------------------------------------


def test_cluster_yaml_passes_ray_validation(prepared: dict[str, Any]) -> None:
    # `prepared` already went through validate_config; check it kept what we wrote.
    assert prepared["cluster_name"] == "ingan-batch"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"].get("region"), "provider.region must be set"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _unknown_top_level_key(c: dict[str, Any]) -> None:
    c["max_worker"] = 8  # typo of max_workers


def _wrong_type_top_level(c: dict[str, Any]) -> None:
    c["max_workers"] = "eight"


def _unknown_node_type_key(c: dict[str, Any]) -> None:
    next(iter(worker_types(c).values()))["min_worker"] = 0  # typo of min_workers


def _negative_resource(c: dict[str, Any]) -> None:
    next(iter(worker_types(c).values()))["resources"] = {"CPU": 4, "GPU": -1}


def _missing_node_config(c: dict[str, Any]) -> None:
    del next(iter(worker_types(c).values()))["node_config"]


def _start_commands_not_a_list(c: dict[str, Any]) -> None:
    c["worker_start_ray_commands"] = "ray start --address=$RAY_HEAD_IP:6379"


def _head_type_not_defined(c: dict[str, Any]) -> None:
    c["head_node_type"] = "no-such-type"


def _min_workers_above_max(c: dict[str, Any]) -> None:
    next(iter(worker_types(c).values()))["min_workers"] = c["max_workers"] + 1


BROKEN = [
    pytest.param(_unknown_top_level_key, jsonschema.ValidationError, id="unknown-top-level-key"),
    pytest.param(_wrong_type_top_level, jsonschema.ValidationError, id="wrong-type"),
    pytest.param(_unknown_node_type_key, jsonschema.ValidationError, id="unknown-node-type-key"),
    pytest.param(_negative_resource, jsonschema.ValidationError, id="negative-resource"),
    pytest.param(_missing_node_config, jsonschema.ValidationError, id="missing-node-config"),
    pytest.param(_start_commands_not_a_list, jsonschema.ValidationError, id="commands-not-list"),
    pytest.param(_head_type_not_defined, ValueError, id="undefined-head-type"),
    pytest.param(_min_workers_above_max, ValueError, id="min-workers-above-max"),
]


@pytest.mark.parametrize(("break_it", "error"), BROKEN)
def test_broken_copies_are_rejected(
    raw: dict[str, Any], break_it: Callable[[dict[str, Any]], None], error: type[Exception]
) -> None:
    """The validator is really exercised: the same call rejects broken copies of the file."""
    broken = copy.deepcopy(raw)
    break_it(broken)
    with pytest.raises(error):
        ray_up_validate(broken)


# --- Properties the docs promise --------------------------------------------------------------


def test_gpu_workers_scale_from_zero(raw: dict[str, Any]) -> None:
    gpu_types = gpu_worker_types(raw)
    assert gpu_types, "no worker type states a GPU in `resources`"
    for name, spec in gpu_types.items():
        assert spec.get("min_workers") == 0, f"{name}: GPU workers must scale from zero"
        assert spec.get("max_workers", 0) >= 1, f"{name}: max_workers must allow a node"
    assert raw["max_workers"] >= 1
    for name, spec in worker_types(raw).items():
        assert spec.get("min_workers", 0) == 0, f"{name}: an idle cluster must cost only the head"


def test_head_offers_no_gpu(raw: dict[str, Any]) -> None:
    assert head_type(raw).get("resources", {}).get("GPU", 0) == 0
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--num-gpus=0" in head_start, "training tasks must not land on the head"


def test_head_terminates_on_shutdown(raw: dict[str, Any]) -> None:
    # `ray submit --stop` shuts the head down from inside; a merely stopped head would be invisible
    # to `ray down` and keep billing its volume.
    assert head_type(raw)["node_config"].get("InstanceInitiatedShutdownBehavior") == "terminate"
    assert raw["provider"].get("cache_stopped_nodes") is False


def test_ray_pin_matches_pyproject(raw: dict[str, Any], prepared: dict[str, Any]) -> None:
    pin = pyproject_ray_pin()
    for config in (raw, prepared):
        pins = [
            m.group(1)
            for cmd in all_setup_commands(config)
            for m in RAY_PIN_IN_COMMAND.finditer(cmd)
        ]
        assert pins, "setup commands must install a pinned ray (ray[default]==X)"
        assert set(pins) == {pin}, f"setup commands pin ray {sorted(set(pins))}, pyproject {pin}"
    # The pin must reach the workers, not only the head.
    worker_pins = [
        m.group(1)
        for cmd in prepared["worker_setup_commands"]
        for m in RAY_PIN_IN_COMMAND.finditer(cmd)
    ]
    assert worker_pins == [pin] * len(worker_pins) and worker_pins


def test_workers_have_an_instance_profile(raw: dict[str, Any]) -> None:
    for name, spec in worker_types(raw).items():
        profile = spec["node_config"].get("IamInstanceProfile")
        assert isinstance(profile, dict), f"{name}: IamInstanceProfile missing (tasks need S3)"
        assert profile.get("Arn") or profile.get("Name"), f"{name}: IamInstanceProfile is empty"
        if "Arn" in profile:
            assert re.match(r"^arn:aws[\w-]*:iam::\d{12}:instance-profile/.+", profile["Arn"])
    # The head's is optional (Ray creates a default one), but if present it must be well formed.
    head_profile = head_type(raw)["node_config"].get("IamInstanceProfile")
    if head_profile is not None:
        assert head_profile.get("Arn") or head_profile.get("Name")


def test_package_installed_on_every_node(raw: dict[str, Any], prepared: dict[str, Any]) -> None:
    # `ray submit` copies only run.py; the package must come from the repo copied by file_mounts.
    mounts = {remote for remote, local in raw["file_mounts"].items() if local in (".", "./")}
    assert mounts, 'file_mounts must copy the repository (".") to the nodes'
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in prepared[key] if "pip install" in c]
        assert any(f"-e {remote}" in c for c in installs for remote in mounts), (
            f"{key} must `pip install -e` the mounted repository"
        )
    # The autoscaler on the head needs boto3 to launch workers.
    assert any("boto3" in c for c in prepared["head_setup_commands"])


def test_start_commands(raw: dict[str, Any]) -> None:
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--port=6379" in head_start
    worker_start = " ".join(raw["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker_start


def test_the_autoscalers_gpus_are_counted_from_its_worker_types(tmp_path: Path) -> None:
    """A run on a cluster whose GPU workers scale from zero submits tasks for the GPUs the
    autoscaler may bring up (its pending tasks are what bring them up)."""
    from pipeline.cluster import autoscaler_max_gpus

    assert autoscaler_max_gpus(str(REPO / "cluster.yaml")) == 8.0  # gpu_worker: 1 GPU, up to 8
    path = tmp_path / "bootstrap.yaml"
    path.write_text(
        "max_workers: 10\n"
        "available_node_types:\n"
        "  head: {resources: {}, max_workers: 0}\n"
        "  small: {resources: {CPU: 4, GPU: 1}, max_workers: 3}\n"
        "  big: {resources: {CPU: 48, GPU: 4}, max_workers: 20}\n"  # capped at the cluster's 10
        "  cpus: {resources: {CPU: 16}, max_workers: 5}\n"
    )
    assert autoscaler_max_gpus(str(path)) == 3 * 1 + 10 * 4
    path.write_text("available_node_types:\n  gpu: {resources: {GPU: 2}}\n")  # no bound stated anywhere
    assert autoscaler_max_gpus(str(path)) == 2.0
    assert autoscaler_max_gpus(str(tmp_path / "absent.yaml")) == 0.0
    path.write_text("available_node_types:\n  odd: {resources: {GPU: lots}, max_workers: 2}\n"
                    "  gpu: {resources: {GPU: 1}, max_workers: many}\n  ok: {resources: {GPU: 1}, max_workers: 2}\n")
    assert autoscaler_max_gpus(str(path)) == 2.0
    path.write_text("just a string\n")
    assert autoscaler_max_gpus(str(path)) == 0.0
