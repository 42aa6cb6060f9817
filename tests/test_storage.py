"""DVC remote set-up, failure diagnosis and the push task's retry policy (no S3 server needed;
the transfers themselves are tested against one in tests/integration/test_s3.py)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from pipeline_lib.adapters import dvc_remote
from pipeline_lib.adapters.dvc_remote import PushError, S3Remote, StorageError, configure_dvc_remote


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens there once the socket closes


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    return tmp_path


@pytest.mark.parametrize(
    ("dvc_output", "transient", "hint"),
    [
        ("ERROR: unexpected error - Could not connect to the endpoint URL: http://x/b", True, ""),
        ("ERROR: failed to push data to the cloud - 597 files failed to upload", True, ""),
        (
            "ERROR: unexpected error - An error occurred (NoSuchBucket) when calling the PutObject "
            "operation",
            False,
            "create it",
        ),
        (
            "ERROR: unexpected error - Forbidden: An error occurred (403) when calling "
            "the HeadObject operation: Forbidden",
            False,
            "AWS_SECRET_ACCESS_KEY",
        ),
        ("ERROR: unexpected error - Unable to locate credentials", False, "AWS_ACCESS_KEY_ID"),
        (
            "ERROR: failed to push data to the cloud - no remote specified in /r",
            False,
            "setup_s3_remote",
        ),
    ],
)
def test_failures_are_explained_and_classed_transient_or_not(
    dvc_output: str, transient: bool, hint: str
) -> None:
    message, is_transient = dvc_remote.explain_failure(
        f"{dvc_output}\n\nHaving any troubles? ...\n"
    )
    assert is_transient is transient
    assert hint in message and not message.startswith("ERROR")
    assert "Having any troubles" not in message


def test_remote_names_its_bucket_and_endpoint() -> None:
    remote = S3Remote("s3://bucket/dvc/store", endpoint_url="http://127.0.0.1:8333")
    assert remote.bucket == "bucket"
    assert remote.describe() == "remote 'storage' (s3://bucket/dvc/store at http://127.0.0.1:8333)"
    assert "AWS_ENDPOINT_URL" in S3Remote("s3://bucket").describe()
    with pytest.raises(ValueError, match="not on S3"):
        S3Remote("/mnt/dvc-store").bucket  # noqa: B018


def test_remote_set_up_commits_url_and_endpoint_and_keeps_keys_local(repo: Path) -> None:
    remote = S3Remote("s3://bucket/dvc", endpoint_url="http://127.0.0.1:8333", region="eu-west-1")
    configure_dvc_remote(repo, remote, access_key_id="AKIDKEY", secret_access_key="s3cr3t-value")

    committed = (repo / ".dvc" / "config").read_text()
    assert "s3://bucket/dvc" in committed and "http://127.0.0.1:8333" in committed
    assert "AKIDKEY" not in committed and "s3cr3t-value" not in committed
    assert "s3cr3t-value" in (repo / ".dvc" / "config.local").read_text()
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=repo)
    assert ignored.returncode == 0
    assert dvc_remote.committed_secrets(repo) == []
    assert dvc_remote.read_remote(repo) == remote


def test_a_secret_in_the_committed_config_is_found_and_refused(repo: Path) -> None:
    (repo / ".dvc" / "config").write_text(
        "[core]\n    remote = storage\n['remote \"storage\"']\n    url = s3://bucket/dvc\n"
        "    secret_access_key = leaked\n"
    )
    assert dvc_remote.committed_secrets(repo) == ["remote.storage.secret_access_key"]
    with pytest.raises(StorageError, match="secret_access_key.*config.local"):
        configure_dvc_remote(repo, S3Remote("s3://bucket/dvc"))


def test_reconfiguring_a_remote_keeps_its_other_options(repo: Path) -> None:
    configure_dvc_remote(repo, S3Remote("s3://old/dvc", endpoint_url="http://old:1"))
    from dvc.config import Config

    with Config(dvc_dir=str(repo / ".dvc")).edit("repo") as conf:
        conf["remote"]["storage"]["jobs"] = "4"
    configure_dvc_remote(repo, S3Remote("s3://new/dvc"))
    section = Config(dvc_dir=str(repo / ".dvc"))["remote"]["storage"]
    assert section["url"] == "s3://new/dvc" and section["jobs"] == 4
    assert "endpointurl" not in section  # the old endpoint must not outlive its URL


def test_push_without_a_remote_fails_without_retrying(repo: Path) -> None:
    with pytest.raises(PushError, match="no default DVC remote.*setup_s3_remote") as error:
        dvc_remote.push(repo)
    assert not error.value.transient


def test_push_to_a_store_that_does_not_answer_fails_at_once_as_transient(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No endpoint in the config: boto3's AWS_ENDPOINT_URL is the one probed."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    configure_dvc_remote(repo, S3Remote("s3://bucket/dvc"))
    with pytest.raises(PushError, match="remote 'storage'.*does not answer.*untouched") as error:
        dvc_remote.push(repo)
    assert error.value.transient


def test_push_task_retries_transient_failures_with_exponential_backoff() -> None:
    from prefect.states import Failed

    from tasks.storage import push_outputs, retry_if_transient

    assert push_outputs.retries == 4
    delays = push_outputs.retry_delay_seconds
    assert delays == sorted(delays) and delays[-1] >= 4 * delays[0]
    unreachable = Failed(data=PushError("store down", transient=True))
    no_bucket = Failed(data=PushError("NoSuchBucket", transient=False))
    assert retry_if_transient(push_outputs, None, unreachable) is True
    assert retry_if_transient(push_outputs, None, no_bucket) is False
    assert push_outputs.retry_condition_fn is retry_if_transient
