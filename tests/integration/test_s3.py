"""Against a real S3-compatible server (SeaweedFS `weed mini`, credentials checked): DVC
push/pull, MLflow artifacts, dataset sources, and a store that goes away mid-push."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.adapters import dvc_remote
from pipeline_lib.adapters.dvc_remote import (
    PushError,
    S3Remote,
    configure_dvc_remote,
    ensure_bucket,
)
from pipeline_lib.adapters.mlflow_tracker import start_run
from pipeline_lib.config import parse_config
from pipeline_lib.data.schema import validate_prompts
from pipeline_lib.data.sources import SourceError, read_source
from tests.integration.s3_server import TEST_BUCKET, S3Server, make_bucket, running_s3_server

pytestmark = pytest.mark.integration

BIN_DIR = str(Path(sys.executable).parent)
# A stage whose output changes with VERSION: a data file, a nested folder, a 1 MB "checkpoint".
MAKE_OUTPUTS = r"""
import random
from pathlib import Path

VERSION = VERSION_VALUE
rng = random.Random(VERSION)
out = Path("out")
(out / "models").mkdir(parents=True, exist_ok=True)
lines = [f'{{"id": {i}, "version": {VERSION}}}' for i in range(100)]
(out / "train.jsonl").write_text("\n".join(lines) + "\n")
(out / "models" / "model.bin").write_bytes(rng.randbytes(1_000_000))
"""
DVC_YAML = """\
stages:
  make:
    cmd: python make.py
    deps: [make.py]
    outs: [out]
"""


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One `weed mini` for this module (start-up: a second or two), with `TEST_BUCKET` made."""
    with running_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        make_bucket(server, TEST_BUCKET)
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """Client credentials and endpoint in the environment, nothing from ~/.aws."""
    import s3fs

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("PATH", f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}")
    s3fs.S3FileSystem.clear_instance_cache()  # an fs built for another endpoint must not be reused
    return s3_server


def tree_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{args} failed:\n{output}"
    return result.stdout


def dvc_add(repo: Path, target: str) -> None:
    """`dvc add`, in this process (a `dvc` command costs seconds of start-up)."""
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(".") as api:  # DVC resolves targets from the cwd
        api.add(target)


def dvc_repro(repo: Path) -> None:
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(".") as api:
        api.reproduce()


def git(*args: str, cwd: Path) -> str:
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd)


def new_dvc_repo(path: Path) -> Path:
    from dvc.repo import Repo

    path.mkdir(parents=True)
    git("init", "-q", cwd=path)
    Repo.init(str(path)).close()
    return path


def bucket_keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_server_checks_credentials(s3_server: S3Server) -> None:
    """The store refuses unknown keys, so the tests below do exercise credentials."""
    import boto3
    from botocore.exceptions import ClientError

    stranger = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="unknown",
        aws_secret_access_key="wrong-secret",
    )
    with pytest.raises(ClientError, match="InvalidAccessKeyId|AccessDenied|Forbidden"):
        stranger.list_objects_v2(Bucket=TEST_BUCKET)
    assert TEST_BUCKET in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]


@pytest.mark.parametrize("endpoint_from", ["AWS_ENDPOINT_URL", "storage_options"])
def test_dataset_read_from_s3_equals_the_local_file(
    s3_env: S3Server, shared_data: Path, monkeypatch: pytest.MonkeyPatch, endpoint_from: str
) -> None:
    """`s3://` sources go through s3fs; the endpoint comes from the environment or options."""
    local_file = shared_data / "gsm8k" / "test.jsonl"
    s3_env.client().upload_file(str(local_file), TEST_BUCKET, "datasets/gsm8k/test.jsonl")
    options = None
    if endpoint_from == "storage_options":
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        options = {"endpoint_url": s3_env.endpoint_url}

    remote = read_source(f"s3://{TEST_BUCKET}/datasets/gsm8k/test.jsonl", storage_options=options)

    local = read_source(str(local_file))
    pd.testing.assert_frame_equal(remote, local)
    assert len(validate_prompts(remote, origin="gsm8k")) == len(local) > 1000


def test_missing_s3_dataset_is_a_source_error_naming_it(s3_env: S3Server) -> None:
    url = f"s3://{TEST_BUCKET}/datasets/nothing-here.jsonl"
    with pytest.raises(SourceError, match="nothing-here.jsonl"):
        read_source(url)


def test_mlflow_artifacts_go_to_s3_and_come_back(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Artifact root `s3://bucket/mlflow`, endpoint from MLFLOW_S3_ENDPOINT_URL alone."""
    from mlflow import MlflowClient

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env.endpoint_url)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    source = tmp_path / "source"
    (source / "model").mkdir(parents=True)
    (source / "model" / "weights.bin").write_bytes(os.urandom(300_000))
    (source / "model" / "config.json").write_text('{"hidden_size": 128}')
    (source / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")

    with start_run(uri, "s3-artifacts", artifact_location=f"s3://{TEST_BUCKET}/mlflow") as run:
        run.log_artifact(source / "dvc.lock", "pipeline")
        run.log_artifact(source / "model", "model")
        run.log_dict({"accuracy": 0.5}, "summary.json")
    run_id = run.run_id

    client = MlflowClient(tracking_uri=uri)
    artifact_uri = client.get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith(f"s3://{TEST_BUCKET}/mlflow/")
    prefix = artifact_uri.removeprefix(f"s3://{TEST_BUCKET}/")
    names = ("pipeline/dvc.lock", "model/weights.bin", "model/config.json", "summary.json")
    assert {f"{prefix}/{name}" for name in names} <= set(bucket_keys(s3_env, TEST_BUCKET, prefix))
    downloaded = Path(client.download_artifacts(run_id, "", str(tmp_path / "download")))
    assert tree_hashes(downloaded / "model") == tree_hashes(source / "model")
    assert (downloaded / "pipeline" / "dvc.lock").read_bytes() == (source / "dvc.lock").read_bytes()


def test_dvc_push_then_pull_at_that_commit_restores_outputs_exactly(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round trip through S3, and the pin: commit + the run's dvc.lock from MLflow -> same bytes.

    Credentials come from the environment only; the endpoint from the committed config.
    """
    from mlflow import MlflowClient

    from tasks.storage import record_pushed_state

    bucket = "dvc-roundtrip"
    assert ensure_bucket(bucket, endpoint_url=s3_env.endpoint_url) is True
    assert ensure_bucket(bucket, endpoint_url=s3_env.endpoint_url) is False
    repo = new_dvc_repo(tmp_path / "repo")
    configure_dvc_remote(repo, S3Remote(f"s3://{bucket}/dvc", endpoint_url=s3_env.endpoint_url))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    (repo / "make.py").write_text(MAKE_OUTPUTS.replace("VERSION_VALUE", "1"))
    (repo / "dvc.yaml").write_text(DVC_YAML)
    dvc_repro(repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "v1", cwd=repo)
    first = tree_hashes(repo / "out")
    committed_config = git("show", "HEAD:.dvc/config", cwd=repo)
    assert s3_env.endpoint_url in committed_config
    assert s3_env.access_key not in committed_config and s3_env.secret_key not in committed_config

    pushed = dvc_remote.push(repo)
    assert "pushed" in pushed.summary and pushed.remote.endpoint_url == s3_env.endpoint_url
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "out").exists() and not (clone / ".dvc" / "cache").exists()
    dvc_remote.pull(clone)
    assert tree_hashes(clone / "out") == first

    # A second run leaves dvc.lock changed but uncommitted, as a deployment's run does.
    (repo / "make.py").write_text(MAKE_OUTPUTS.replace("VERSION_VALUE", "2"))
    dvc_repro(repo)
    second = tree_hashes(repo / "out")
    assert second != first
    pushed_dict = {
        "remote": pushed.remote.name,
        "url": pushed.remote.url,
        "endpoint_url": s3_env.endpoint_url,
        "summary": dvc_remote.push(repo).summary,
    }
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env.endpoint_url)
    config = parse_config(
        {
            "tracking": {
                "uri": uri,
                "experiment": "pin",
                "artifact_location": f"s3://{TEST_BUCKET}/pin",
            }
        }
    )
    with start_run(uri, "pin", artifact_location=config.tracking.artifact_location) as parent:
        pass
    monkeypatch.chdir(repo)  # git_commit() reads the working directory's repository
    record_pushed_state.fn(config, parent.run_id, pushed_dict, repo_dir=str(repo))

    tags = MlflowClient(uri).get_run(parent.run_id).data.tags
    assert tags["git_commit"] == git("rev-parse", "HEAD", cwd=repo).strip()
    assert "dvc.lock" in tags["git_dirty"] and tags["dvc.remote_url"] == f"s3://{bucket}/dvc"
    lock = MlflowClient(uri).download_artifacts(parent.run_id, "dvc/dvc.lock", str(tmp_path))
    shutil.copy(lock, clone / "dvc.lock")  # the clone is still at the recorded commit
    dvc_remote.pull(clone)
    assert tree_hashes(clone / "out") == second


def test_push_to_a_missing_bucket_or_with_a_wrong_key_fails_at_once_and_says_why(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = new_dvc_repo(tmp_path / "repo")
    (repo / "a.txt").write_text("a")
    dvc_add(repo, "a.txt")
    endpoint = s3_env.endpoint_url
    configure_dvc_remote(repo, S3Remote("s3://no-such-bucket/dvc", endpoint_url=endpoint))
    with pytest.raises(PushError, match="remote 'storage'.*no-such-bucket.*create it") as missing:
        dvc_remote.push(repo)
    assert not missing.value.transient  # a retry cannot help: the task must not retry

    configure_dvc_remote(repo, S3Remote(f"s3://{TEST_BUCKET}/dvc", endpoint_url=endpoint))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PushError, match=s3_env.endpoint_url) as refused:
        dvc_remote.push(repo)
    assert not refused.value.transient and "AWS_SECRET_ACCESS_KEY" in str(refused.value)


@pytest.fixture
def fresh_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A server of the test's own, which the test may kill and restart."""
    with running_s3_server(tmp_path / "seaweedfs") as server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail within seconds once the store is gone
        make_bucket(server, "outage")
        yield server


def test_store_lost_mid_push_gives_a_clear_transient_error_and_loses_nothing_local(
    fresh_server: S3Server, tmp_path: Path
) -> None:
    """Kill the server while `dvc push` uploads; push while it is down; restart, push again."""
    server = fresh_server
    repo = new_dvc_repo(tmp_path / "repo")
    data = repo / "data"
    data.mkdir()
    for index in range(250):
        (data / f"shard-{index:04d}.bin").write_bytes(os.urandom(8192))
    (data / "checkpoint.bin").write_bytes(os.urandom(5_000_000))
    dvc_add(repo, "data")
    configure_dvc_remote(repo, S3Remote("s3://outage/dvc", endpoint_url=server.endpoint_url))

    def local_state() -> dict[str, str]:
        cache = tree_hashes(repo / ".dvc" / "cache")
        return tree_hashes(data) | {f".dvc/cache/{name}": h for name, h in cache.items()}

    before = local_state()
    outcome: dict[str, object] = {}

    def push_in_background() -> None:
        try:
            outcome["result"] = dvc_remote.push(repo, jobs=2, unreachable_after_s=3)
        except PushError as error:
            outcome["error"] = error

    pusher = threading.Thread(target=push_in_background)
    pusher.start()
    deadline = time.monotonic() + 120
    while not bucket_keys(server, "outage") and pusher.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()
    killed_at = time.monotonic()
    pusher.join(timeout=120)

    assert "result" not in outcome, "push finished before the outage: make the payload larger"
    error = outcome["error"]
    assert isinstance(error, PushError) and error.transient  # the Prefect task retries these
    assert "remote 'storage'" in str(error) and server.endpoint_url in str(error)
    assert time.monotonic() - killed_at < 60  # not minutes of DVC retrying file after file
    assert local_state() == before
    with pytest.raises(PushError, match="does not answer") as down:
        dvc_remote.push(repo)
    assert down.value.transient

    server.start()  # same ports, same data folder
    assert "pushed" in dvc_remote.push(repo).summary
    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc_remote.pull(repo)
    assert local_state() == before


@pytest.mark.slow  # a temporary Prefect server: 15-60 s to start on 2 cores
def test_push_task_retries_an_unreachable_store_with_backoff_then_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through Prefect's engine: a transient failure is retried (waits growing), a missing
    remote is not, and the final error names the remote and its endpoint."""
    import socket

    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from tasks.storage import push_outputs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once closed
    down = new_dvc_repo(tmp_path / "down")
    configure_dvc_remote(down, S3Remote("s3://bucket/dvc", endpoint_url=endpoint))
    unconfigured = new_dvc_repo(tmp_path / "unconfigured")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    attempts: dict[str, list[float]] = {str(down): [], str(unconfigured): []}
    real_push = dvc_remote.push

    def counted_push(repo_dir: str, *args: object, **kwargs: object) -> dvc_remote.TransferResult:
        attempts[repo_dir].append(time.monotonic())
        return real_push(repo_dir, *args, **kwargs)

    monkeypatch.setattr(dvc_remote, "push", counted_push)  # counts the task's attempts, no more
    quick = push_outputs.with_options(retries=2, retry_delay_seconds=[0.5, 1.0])

    @flow
    def push_and_report(repo_dir: str) -> str:
        state = quick(repo_dir=repo_dir, return_state=True)
        assert state.is_failed()
        return str(state.result(raise_on_failure=False))

    with prefect_test_harness(server_startup_timeout=300):
        unreachable_error = push_and_report(str(down))
        no_remote_error = push_and_report(str(unconfigured))

    times = attempts[str(down)]
    assert len(times) == 3  # the first try and 2 retries
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.35 and gaps[1] > gaps[0]  # 0.5 s then 1 s, +-20 % jitter
    assert "remote 'storage'" in unreachable_error and endpoint in unreachable_error
    assert len(attempts[str(unconfigured)]) == 1  # not retried: no retry can help
    assert "no default DVC remote" in no_remote_error
