"""service.yaml and containerfile: what `anyscale service deploy -f service.yaml` would read.

Nothing here reaches Anyscale: the config is parsed by the anyscale package's own
ServiceConfig, the application args by ServeTPConfig, and the app is built by its builder.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from anyscale.compute_config.models import ComputeConfig
from anyscale.service.models import ServiceConfig
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.serve import Application
from ray.serve._private.utils import import_attr
from ray.serve.schema import ServeApplicationSchema

from serve_tp.config import ServeTPConfig

ROOT = Path(__file__).resolve().parents[1]

# GPUs per node of the instance types service.yaml may name; add one here when it does.
GPUS_PER_INSTANCE = {
    "g4dn.12xlarge": 4,
    "g5.12xlarge": 4,
    "g5.24xlarge": 4,
    "g5.48xlarge": 8,
    "g6.12xlarge": 4,
    "g6e.12xlarge": 4,
    "p4d.24xlarge": 8,
    "p5.48xlarge": 8,
}


@pytest.fixture(scope="module")
def service() -> ServiceConfig:
    return ServiceConfig.from_yaml(str(ROOT / "service.yaml"))


@pytest.fixture(scope="module")
def app_entry(service: ServiceConfig) -> dict:
    assert len(service.applications) == 1, "service.yaml should run exactly one application"
    return service.applications[0]


def requirement_pins(lines: list[str]) -> set[str]:
    """Requirement specifiers, normalised: no comments, options, quotes or spaces."""
    pins = set()
    for line in lines:
        line = line.split("#", 1)[0].strip().strip("\"'")
        if line and not line.startswith("-"):
            pins.add(line.replace(" ", "").lower())
    return pins


def containerfile_text() -> str:
    return (ROOT / "containerfile").read_text()


def test_service_yaml_loads_with_anyscale(service: ServiceConfig) -> None:
    assert service.name == "tp-service"
    assert service.query_auth_token_enabled is True
    assert service.working_dir == "."
    assert (ROOT / service.containerfile).is_file()
    assert isinstance(service.compute_config, ComputeConfig)
    assert service.compute_config.head_node is not None
    assert service.compute_config.worker_nodes, "a GPU worker group is needed"


def test_base_image_ray_matches_requirements() -> None:
    image = re.search(r"^FROM\s+anyscale/ray:(\S+)", containerfile_text(), re.MULTILINE)
    assert image, "containerfile must start FROM an anyscale/ray image"
    image_ray = image.group(1).split("-", 1)[0]
    pin = re.search(r"^ray\[serve\]==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert pin, "requirements.txt must pin ray[serve]==X.Y.Z"
    assert image_ray == pin.group(1), f"image has Ray {image_ray}, requirements.txt pins {pin.group(1)}"


def test_containerfile_installs_exactly_requirements() -> None:
    # Anyscale builds from the file's text without a build context, so the pins are
    # repeated in the containerfile rather than COPYed: they must not drift.
    joined = containerfile_text().replace("\\\n", " ")
    installs = [line for line in joined.splitlines() if re.match(r"\s*RUN\s+pip\s+install\b", line)]
    assert len(installs) == 1, "expected one `RUN pip install` line"
    installed = requirement_pins(shlex.split(installs[0])[3:])
    wanted = requirement_pins((ROOT / "requirements.txt").read_text().splitlines())
    assert installed == wanted


def test_oldest_pins_are_the_lower_bounds_of_the_ranges() -> None:
    # CI's second run installs requirements-oldest.txt; if a range's floor moved without it,
    # that run would test a release the ranges no longer allow (or one they never did).
    ranged = {}
    for spec in requirement_pins((ROOT / "requirements.txt").read_text().splitlines()):
        req = Requirement(spec)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        if floors and any(s.operator == "<" for s in req.specifier):
            ranged[canonicalize_name(req.name)] = floors[0]
    oldest = {}
    for spec in requirement_pins((ROOT / "requirements-oldest.txt").read_text().splitlines()):
        req = Requirement(spec)
        (pin,) = req.specifier
        assert pin.operator == "==", f"requirements-oldest.txt pins exact versions, not {spec}"
        oldest[canonicalize_name(req.name)] = pin.version
    assert {"transformers", "tokenizers", "huggingface-hub"} <= set(ranged)
    assert oldest == ranged


def test_application_is_a_valid_serve_config(app_entry: dict) -> None:
    ServeApplicationSchema(**app_entry)
    assert app_entry["import_path"] == "serve_tp.app:build_app"


def test_args_validate_against_serve_tp_config(app_entry: dict) -> None:
    config = ServeTPConfig.model_validate(app_entry["args"])
    assert config.device == "cuda"
    assert config.tensor_parallel_size >= 2


def test_compute_config_fits_the_largest_replica_count(service: ServiceConfig, app_entry: dict) -> None:
    """Every replica's ranks share one node (STRICT_PACK), so nodes must hold whole TP groups."""
    config = ServeTPConfig.model_validate(app_entry["args"])
    max_replicas = config.autoscaling_config.max_replicas if config.autoscaling_config else config.num_replicas
    groups = 0
    for group in service.compute_config.worker_nodes:
        assert group.instance_type in GPUS_PER_INSTANCE, f"unknown GPU count for {group.instance_type}"
        assert group.min_nodes <= group.max_nodes
        groups += GPUS_PER_INSTANCE[group.instance_type] // config.tensor_parallel_size * group.max_nodes
    assert groups >= max_replicas, f"room for {groups} TP groups, max_replicas is {max_replicas}"


def test_builder_builds_the_application_on_cpu(app_entry: dict) -> None:
    build = import_attr(app_entry["import_path"])
    app = build({**app_entry["args"], "device": "cpu", "dtype": "float32"})
    assert isinstance(app, Application)
