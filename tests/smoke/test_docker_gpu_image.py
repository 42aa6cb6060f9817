"""What can be checked of the GPU image without a GPU and without its multi-GB downloads.

What `make docker-gpu-check` runs (as root):

1. `requirements/lock-gpu.txt` still resolves for its platform (Linux x86_64, manylinux
   2.28, Python 3.11): `uv pip compile requirements/gpu.in` with the lock as the
   preference must give the lock back unchanged (metadata only, no wheels downloaded).
2. docker/Dockerfile.gpu builds on the local base image (ops/docker_engine.py) with a
   stand-in for the CUDA environment: REQUIREMENTS=a one-line lock (setuptools, which the
   editable install needs), VLLM=a small pure-Python wheel. Every other step is the real
   one: uv, the venv, the lock install and `--no-deps` vLLM step, the project's editable
   install, the user, the caches, the worker command. The image then imports the project.

Not run: the CUDA base image (no registry), torch 2.14.0 + CUDA 13 and vLLM 0.33.0 (about
10 GB of wheels), anything on a GPU.
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.docker_engine import (
    BASE_IMAGE,
    DEFAULT_CACHE_DIR,
    DockerEngine,
    ensure_base_image,
    log,
    running_dockerd,
)
from pipeline_lib.adapters.processes import exit_on_sigterm
from tests.smoke.deploy import REPO_ROOT
from tests.smoke.docker_image import LOCAL_INPUTS, stage_local_inputs

# Not in `make test` (it never ran these): its make target opts in (tests/conftest.py).
pytestmark = [pytest.mark.docker, pytest.mark.integration, pytest.mark.slow, pytest.mark.stack]

STANDIN_IMAGE = "knapsack-rl-gpu:standin"
STANDIN_LOCK = "setuptools==84.2.1\n"  # the lock's own setuptools pin
STANDIN_VLLM = "six==1.17.0"  # any small wheel in place of vllm==0.33.0


def test_gpu_lock_still_resolves_for_its_platform():
    """uv pip compile gpu.in for the GPU platform reproduces lock-gpu.txt exactly."""
    lock = REPO_ROOT / "requirements" / "lock-gpu.txt"
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "lock-gpu.txt"
        shutil.copy(lock, output)
        uv = Path(sys.executable).parent / "uv"
        result = subprocess.run(
            [
                str(uv),
                "pip",
                "compile",
                "requirements/gpu.in",
                "--python-version",
                "3.11",
                "--python-platform",
                "x86_64-manylinux_2_28",
                "--no-header",
                "-o",
                str(output),
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        diff = list(
            difflib.unified_diff(
                lock.read_text().splitlines(), output.read_text().splitlines(), lineterm=""
            )
        )
    log(
        f"lock-gpu.txt resolves for x86_64-manylinux_2_28 / Python 3.11: "
        f"{'unchanged' if not diff else 'CHANGED'}"
    )
    assert not diff, "\n".join(diff[:60])


@pytest.fixture(scope="module")
def standin_image() -> Iterator[DockerEngine]:
    """Dockerfile.gpu built with the stand-in lock and vLLM, in a running private dockerd."""
    if os.geteuid() != 0:
        pytest.skip("starting dockerd needs root")
    exit_on_sigterm()  # SIGTERM unwinds to the daemon's stop
    (LOCAL_INPUTS / "gpu-standin.txt").write_text(STANDIN_LOCK)
    stage_local_inputs()
    with running_dockerd(DEFAULT_CACHE_DIR) as engine:
        ensure_base_image(engine)
        started = time.monotonic()
        result = subprocess.run(
            [
                "/usr/bin/docker",
                "build",
                "--network",
                "host",
                "--progress",
                "plain",
                "-f",
                "docker/Dockerfile.gpu",
                "--build-arg",
                f"BASE_IMAGE={BASE_IMAGE}",
                "--build-arg",
                "UV_SOURCE=pypi",
                "--build-arg",
                "REQUIREMENTS=docker/local/gpu-standin.txt",
                "--build-arg",
                f"VLLM={STANDIN_VLLM}",
                "-t",
                STANDIN_IMAGE,
                ".",
            ],
            cwd=REPO_ROOT,
            env=engine.env | {"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        log(f"built {STANDIN_IMAGE} in {time.monotonic() - started:.0f} s")
        try:
            yield engine
        finally:
            engine.docker("image", "rm", STANDIN_IMAGE, check=False)


def test_standin_gpu_image_imports_the_project(standin_image):
    """`docker run` fails (and raises) unless the project and the stand-in vLLM import."""
    check = standin_image.docker(
        "run",
        "--rm",
        "--network",
        "host",
        STANDIN_IMAGE,
        "python",
        "-c",
        "import sys, pipeline_lib, six; print(sys.version.split()[0], "
        "pipeline_lib.__file__, six.__version__)",
    )
    log(f"stand-in image runs: {check.stdout.strip()}")
    assert check.stdout.startswith("3.11") and "pipeline_lib" in check.stdout, check.stdout


def test_standin_gpu_image_runs_as_uid_1000_with_the_worker_command(standin_image):
    user = standin_image.docker("run", "--rm", STANDIN_IMAGE, "id", "-u").stdout.strip()
    command = standin_image.docker(
        "image", "inspect", "--format", "{{json .Config.Cmd}}", STANDIN_IMAGE
    ).stdout.strip()
    log(f"stand-in image: uid {user}; command {command}")
    assert user == "1000"
    assert "worker" in command, command
