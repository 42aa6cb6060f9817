"""Suite-wide settings: offline, no telemetry, and paths to the shared test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before any test module imports mlflow, prefect or vllm: they read these at import.
for name, value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "DVC_NO_ANALYTICS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(name, value)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data next to the repository (math datasets for tests)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


# Harnesses that `make test` leaves out (each has its own make target, which opts in):
# marker -> what it costs. `pytest --opt-in NAME` runs them.
OPT_IN = {
    "reproducibility": "two `make run`s in fresh clones (~30 min; make check-reproducible)",
    "faults": "fault trials: kills, outages, a full disk (~15-25 min, root; make fault-trials)",
    "stack": "the Docker team stack or the GPU image build (make docker-stack-smoke, "
    "make docker-gpu-check)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--opt-in",
        action="append",
        default=[],
        choices=sorted(OPT_IN),
        help="also run the tests of this opt-in marker (repeatable): "
        + "; ".join(f"{name}: {cost}" for name, cost in OPT_IN.items()),
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    chosen = set(config.getoption("--opt-in"))
    for item in items:
        for name in set(OPT_IN) - chosen:
            if name in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"{OPT_IN[name]}: give --opt-in {name}"))
