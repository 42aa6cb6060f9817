"""The S3 server (SeaweedFS) killed during `dvc push`, 5 times at different moments: a
transient PushError, a retry that succeeds, and `dvc pull` into a clean clone reproduces
the bytes."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline_lib.adapters import dvc_remote
from tests.faults.harness import tree_digest
from tests.integration.s3_server import S3Server, make_bucket, running_s3_server

pytestmark = pytest.mark.faults

# Twice the last kill threshold: the push is still running when the last kill comes (with
# 300 files a fast push finished before 240 uploads were listed).
PUSH_FILES = 480
KILL_AFTER_UPLOADS = (1, 40, 100, 170, 240)
BUCKET = "fault-trials"
IDENTITY = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost",
}  # fmt: skip


def git(*args: str, cwd: Path) -> None:
    """Run a git or dvc command; the environment at call time holds the S3 endpoint and keys."""
    env = dict(os.environ) | IDENTITY
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[-3:])} failed: {done.stderr.strip()[-500:]}")


@dataclass
class PushRepo:
    workdir: Path
    repo: Path
    data: Path
    server: S3Server


@pytest.fixture(scope="module")
def push_repo(fault_root: Path) -> Iterator[PushRepo]:
    """A git + DVC repository of PUSH_FILES small files, and a running S3 server."""
    workdir = fault_root / "s3"
    repo = workdir / "repo"
    data = repo / "data"
    data.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(PUSH_FILES):
        (data / f"f{i:03d}.bin").write_bytes(rng.randbytes(16384))
    git("git", "init", "-q", cwd=repo)
    git(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    git(sys.executable, "-m", "dvc", "add", "-q", "data", cwd=repo)
    with (
        running_s3_server(workdir / "s3-data", seed=0) as server,
        pytest.MonkeyPatch.context() as mp,
    ):
        for name, value in server.env.items():
            mp.setenv(name, value)
        make_bucket(server, BUCKET)
        yield PushRepo(workdir, repo, data, server)


def push_and_kill(setup: PushRepo, prefix: str, threshold: int) -> tuple[dict, int, bool]:
    """Push to `prefix` in a thread; SIGKILL the server after `threshold` uploads.

    Returns the push's outcome ({"result": ...} or {"error": ...}), the uploads counted
    and whether the push was still running at the kill.
    """
    client = setup.server.client()
    outcome: dict[str, object] = {}

    def push() -> None:
        try:
            outcome["result"] = dvc_remote.push(setup.repo, jobs=2, unreachable_after_s=5)
        except dvc_remote.PushError as error:
            outcome["error"] = error

    pusher = threading.Thread(target=push)
    pusher.start()
    uploaded = 0
    while pusher.is_alive() and uploaded < threshold:
        with contextlib.suppress(Exception):
            listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
            uploaded = listing.get("KeyCount", 0)
        time.sleep(0.05)
    during = pusher.is_alive()
    setup.server.kill()
    pusher.join(timeout=120)
    return outcome, uploaded, during


@pytest.mark.parametrize(
    ("index", "threshold"),
    list(enumerate(KILL_AFTER_UPLOADS)),
    ids=[f"#{index + 1}" for index in range(len(KILL_AFTER_UPLOADS))],
)
def test_s3_kill_during_push_is_transient_and_a_retry_restores_the_bytes(
    push_repo: PushRepo, record_property, index: int, threshold: int
):
    prefix = f"trial{index}"
    remote = dvc_remote.S3Remote(
        f"s3://{BUCKET}/{prefix}", endpoint_url=push_repo.server.endpoint_url
    )
    dvc_remote.configure_dvc_remote(push_repo.repo, remote)
    git("git", "add", "-A", cwd=push_repo.repo)
    git("git", "commit", "-q", "--allow-empty", "-m", prefix, cwd=push_repo.repo)
    outcome, uploaded, during = push_and_kill(push_repo, prefix, threshold)
    error = outcome.get("error")
    problems = []
    if not during:
        problems.append(f"the push ended before the kill ({uploaded} objects)")
    if not isinstance(error, dvc_remote.PushError):
        problems.append(f"no PushError after the kill: {outcome}")
    elif not error.transient:
        problems.append(f"PushError not transient: {error}")
    push_repo.server.start()
    retried = dvc_remote.push(push_repo.repo, jobs=2)  # the retry (Prefect's, in the pipeline)
    clean = push_repo.workdir / f"clean-{index}"
    git("git", "clone", "-q", str(push_repo.repo), str(clean), cwd=push_repo.workdir)
    git(sys.executable, "-m", "dvc", "pull", "-q", cwd=clean)
    if tree_digest(clean / "data") != tree_digest(push_repo.data):
        problems.append("dvc pull into a clean clone did not reproduce the bytes")
    shutil.rmtree(clean, ignore_errors=True)
    assert not problems, "; ".join(problems)
    message = str(error).splitlines()[0][:160] if error else ""
    record_property(
        "detail",
        f"killed after {uploaded} uploads: {message!r} (transient); retry: "
        f"{retried.summary!r}; clean clone pulled {PUSH_FILES} identical files",
    )
