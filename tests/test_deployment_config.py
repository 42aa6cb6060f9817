"""prefect.yaml describes deployments of the pipeline flow that match the flow and the stack.

No server is needed: the flow is loaded from each deployment's entrypoint the way
`prefect deploy` loads it, and its signature is compared with the deployment's parameters.
"""

from __future__ import annotations

import inspect

import pytest
import yaml

from tests.conftest import REPO_ROOT

PREFECT_YAML = REPO_ROOT / "prefect.yaml"
COMPOSE_FILE = REPO_ROOT / "docker" / "compose.yaml"


@pytest.fixture(scope="module")
def deployments() -> dict[str, dict]:
    config = yaml.safe_load(PREFECT_YAML.read_text())
    assert config["build"] is None and config["push"] is None  # images: make docker-build
    return {d["name"]: d for d in config["deployments"]}


def test_deployments_exist_for_local_gpu_process_and_gpu_docker(deployments):
    assert {"local", "gpu", "gpu-docker"} <= deployments.keys()


def test_every_deployment_runs_the_pipeline_flow_with_its_own_parameters(deployments, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO_ROOT)
    for deployment in deployments.values():
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        # compare-local: one arm x seed run of `make compare` (compare.deployment).
        expected = "compare-run" if deployment["name"] == "compare-local" else "pipeline"
        assert flow.name == expected, deployment["name"]
        signature = inspect.signature(flow.fn)
        assert set(deployment["parameters"]) <= set(signature.parameters), deployment["name"]


def test_local_deployment_is_on_a_process_pool_and_runs_one_at_a_time(deployments):
    local = deployments["local"]
    assert local["work_pool"]["name"] == "local-process"
    assert local["concurrency_limit"] == 1
    assert local["parameters"]["push"] is False


def test_gpu_docker_deployment_uses_the_gpu_image_with_all_gpus_on_the_stack_network(
    deployments,
):
    job = deployments["gpu-docker"]["work_pool"]["job_variables"]
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    default_image = compose["services"]["worker-gpu"]["image"].split(":-", 1)[1].rstrip("}")
    assert job["image"] == default_image
    assert job["container_create_kwargs"]["device_requests"] == [
        {"count": -1, "capabilities": [["gpu"]]}
    ]
    assert job["networks"] == [compose["networks"]["default"]["name"]]


def test_remote_deployments_clone_the_repository_named_by_the_worker_environment(deployments):
    for name in ("gpu", "gpu-docker"):
        steps = [next(iter(step)) for step in deployments[name]["pull"]]
        assert steps == [
            "prefect.deployments.steps.git_clone",
            "prefect.deployments.steps.set_working_directory",
        ], name
        clone = deployments[name]["pull"][0]["prefect.deployments.steps.git_clone"]
        assert clone["repository"] == "{{ $KNAPSACK_RL_GIT_URL }}"
