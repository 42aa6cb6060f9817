"""DVC remotes on S3 or an S3-compatible store (SeaweedFS, MinIO, Ceph...): set up, push, pull.

What goes where, so that nothing secret is ever committed:
  - `.dvc/config` (committed): the remote's URL, `endpointurl` for an S3-compatible
    store, `region`. Enough for anyone at that commit to `dvc pull` once they have
    credentials.
  - credentials: the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, or any
    other source boto3 knows), or `.dvc/config.local`, which `dvc init` git-ignores.
    `AWS_ENDPOINT_URL` also works in place of `endpointurl`: boto3 reads it, and DVC,
    s3fs and MLflow all talk to S3 through boto3.

`dvc push` does not create the bucket: `ensure_bucket` does, once, at set-up.
Pushing and pulling run the DVC command line in a subprocess (the same `dvc` as this
interpreter's). DVC alone, when the store goes away mid-push, retries every remaining
file in turn (minutes for a few hundred files), so the store is probed while it runs and
a store silent for `UNREACHABLE_AFTER_S` ends the transfer. A failure raises `PushError`
/ `PullError` naming the remote, its URL and endpoint, and saying whether trying again
may help (`transient`). Retrying is the caller's business (the Prefect task's retries).
`dvc push` only reads the local cache and workspace, so a failed push loses nothing
local, and the next one uploads only what the remote lacks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline_lib.adapters.redaction import redact, secret_values

DEFAULT_REMOTE = "storage"
PROBE_EVERY_S = 2.0  # how often a running transfer checks that the store still answers
UNREACHABLE_AFTER_S = 15.0  # silence that ends a transfer (DVC alone retries each file)
# Remote options that hold secrets: they belong in .dvc/config.local or the environment.
SECRET_OPTIONS = ("access_key_id", "secret_access_key", "session_token", "password")
# Failures that no retry will fix (AWS error codes and DVC messages, matched in stderr).
PERMANENT_FAILURES = {
    "NoSuchBucket": "the bucket does not exist: create it first "
    "(`python -m ops.setup_s3_remote --create-bucket`; `dvc push` does not create buckets)",
    "InvalidAccessKeyId": "the access key is unknown to the store: check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY",
    "Unable to locate credentials": "no credentials: set AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local <remote> access_key_id ...`",
    "Forbidden": "the store refused the credentials (403): check AWS_ACCESS_KEY_ID, "
    "AWS_SECRET_ACCESS_KEY and the bucket's permissions",
    "AccessDenied": "the store refused the credentials: check the key and the bucket's policy",
    "no remote specified": "no DVC remote configured: run `python -m ops.setup_s3_remote`",
    "config file error": "the DVC configuration is invalid",
}


class StorageError(RuntimeError):
    """A DVC transfer or remote set-up failed; the message names the remote and endpoint.

    `transient` is False when trying again cannot help (missing bucket, bad credentials,
    no remote configured) and True otherwise (store unreachable, timeouts, 5xx).
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        # DVC's and boto3's stderr, quoted in the message, can name a key.
        super().__init__(redact(message, secret_values(os.environ)))
        self.transient = transient


class PushError(StorageError):
    """`dvc push` failed; local outputs and cache are untouched."""


class PullError(StorageError):
    """`dvc pull` failed."""


@dataclass(frozen=True)
class S3Remote:
    """A DVC remote as configured: name, URL and, for an S3-compatible store, its endpoint."""

    url: str
    name: str = DEFAULT_REMOTE
    endpoint_url: str | None = None
    region: str | None = None

    @property
    def bucket(self) -> str:
        """`s3://bucket/prefix` -> `bucket`."""
        if not self.url.startswith("s3://"):
            raise ValueError(f"remote {self.name!r} is not on S3: {self.url}")
        return self.url.removeprefix("s3://").split("/", 1)[0]

    def describe(self) -> str:
        """E.g. `remote 'storage' (s3://bucket/dvc at http://127.0.0.1:8333)`."""
        where = self.endpoint_url or (
            "AWS_ENDPOINT_URL or AWS's default endpoint" if self.url.startswith("s3://") else ""
        )
        return f"remote {self.name!r} ({self.url}{f' at {where}' if where else ''})"


@dataclass(frozen=True)
class TransferResult:
    """What one `dvc push` / `dvc pull` did."""

    remote: S3Remote
    seconds: float
    summary: str  # DVC's last output line, e.g. "3 files pushed"


def _dvc_config(repo_dir: str | Path):
    from dvc.config import Config  # what `dvc remote add/modify` edit, without a subprocess

    return Config(dvc_dir=str(Path(repo_dir) / ".dvc"))


def configure_dvc_remote(
    repo_dir: str | Path,
    remote: S3Remote,
    *,
    default: bool = True,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> None:
    """Add or update `remote` in `<repo_dir>/.dvc/config` (no secrets); keys, if given, go to
    `.dvc/config.local`.

    Same effect as `dvc remote add [-d] -f NAME URL`, `dvc remote modify NAME endpointurl
    ...` and `dvc remote modify --local NAME access_key_id ...`. Leave the keys out to take
    them from the environment. Raises StorageError if `.dvc/config` holds a secret
    afterwards (put there by hand earlier): move it before committing.
    """
    if (access_key_id is None) != (secret_access_key is None):
        raise ValueError("give both access_key_id and secret_access_key, or neither")
    config = _dvc_config(repo_dir)
    with config.edit("repo") as conf:
        section = {"url": remote.url}
        section |= {"endpointurl": remote.endpoint_url} if remote.endpoint_url else {}
        section |= {"region": remote.region} if remote.region else {}
        kept = {
            k: v
            for k, v in conf["remote"].get(remote.name, {}).items()
            if k not in ("url", "endpointurl", "region")
        }
        conf["remote"][remote.name] = kept | section
        if default:
            conf["core"]["remote"] = remote.name
    if access_key_id is not None:
        with config.edit("local") as conf:
            conf["remote"].setdefault(remote.name, {})
            conf["remote"][remote.name] |= {
                "access_key_id": access_key_id,
                "secret_access_key": secret_access_key,
            }
    leaked = committed_secrets(repo_dir)
    if leaked:
        raise StorageError(
            f"{Path(repo_dir) / '.dvc' / 'config'} (committed) holds secrets: {', '.join(leaked)}; "
            "move them to .dvc/config.local (`dvc remote modify --local`) or the environment",
            transient=False,
        )


def committed_secrets(repo_dir: str | Path) -> list[str]:
    """`remote.<name>.<option>` for each secret option set in `.dvc/config` (the committed file)."""
    conf = _dvc_config(repo_dir).read("repo")
    return [
        f"remote.{name}.{option}"
        for name, section in conf["remote"].items()
        for option in section
        if option in SECRET_OPTIONS
    ]


def read_remote(repo_dir: str | Path, name: str | None = None) -> S3Remote:
    """The remote `name` (default: the repo's default remote) from all DVC config levels.

    Raises StorageError (not transient) when there is no such remote.
    """
    conf = _dvc_config(repo_dir)
    name = name or conf["core"].get("remote")
    if not name:
        raise StorageError(
            f"no default DVC remote in {repo_dir}: run `python -m ops.setup_s3_remote`",
            transient=False,
        )
    section = conf["remote"].get(name)
    if section is None:
        raise StorageError(f"DVC remote {name!r} is not configured in {repo_dir}", transient=False)
    return S3Remote(
        url=str(section["url"]),
        name=name,
        endpoint_url=section.get("endpointurl"),
        region=section.get("region"),
    )


def ensure_bucket(
    bucket: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> bool:
    """Create `bucket` unless it exists; True when it was created.

    Credentials and endpoint left as None come from boto3's usual sources (environment,
    ~/.aws). Raises StorageError when the store cannot be reached or refuses.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
    )
    where = f"bucket {bucket!r} at {client.meta.endpoint_url}"
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"cannot check {where}: {error}", transient=False) from error
    except NoCredentialsError as error:
        hint = PERMANENT_FAILURES["Unable to locate credentials"]
        raise StorageError(f"cannot check {where}: {hint}", transient=False) from error
    except BotoCoreError as error:
        raise StorageError(f"cannot reach {where}: {error}") from error
    options = {}
    region = client.meta.region_name  # as given, else boto3's (AWS_DEFAULT_REGION, ~/.aws)
    if region and region != "us-east-1":  # us-east-1 takes no location constraint
        options["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(Bucket=bucket, **options)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou",):
            return False  # made by someone else between our two calls
        raise StorageError(f"cannot create {where}: {error}", transient=False) from error
    return True


def push(
    repo_dir: str | Path = ".",
    remote: str | None = None,
    *,
    jobs: int | None = None,
    timeout_s: float | None = None,
    unreachable_after_s: float = UNREACHABLE_AFTER_S,
) -> TransferResult:
    """`dvc push` of every DVC-tracked output in `repo_dir` to `remote` (default: the default).

    Raises PushError naming the remote and endpoint, with DVC's error and a hint. An S3
    store that stops answering for `unreachable_after_s` ends the push at once (DVC itself
    would retry every file in turn, for minutes): pushing again later uploads only what is
    missing.
    """
    return _transfer("push", repo_dir, remote, jobs, timeout_s, unreachable_after_s)


def pull(
    repo_dir: str | Path = ".",
    remote: str | None = None,
    *,
    jobs: int | None = None,
    timeout_s: float | None = None,
    unreachable_after_s: float = UNREACHABLE_AFTER_S,
) -> TransferResult:
    """`dvc pull`: fetch what `dvc.lock` / `*.dvc` name and check it out into the workspace."""
    return _transfer("pull", repo_dir, remote, jobs, timeout_s, unreachable_after_s)


def store_reachable(remote: S3Remote, timeout_s: float = 3.0) -> bool:
    """Whether the remote's S3 endpoint answers at all (any HTTP reply, even 403, counts).

    Unsigned, so it needs no credentials; the endpoint is boto3's (`endpointurl`, else
    AWS_ENDPOINT_URL, else AWS).
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    client = boto3.client(
        "s3",
        endpoint_url=remote.endpoint_url,
        region_name=remote.region or "us-east-1",
        config=Config(
            signature_version=UNSIGNED,
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"total_max_attempts": 1},
        ),
    )
    try:
        client.head_bucket(Bucket=remote.bucket)
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError):
        return False
    except Exception:  # noqa: BLE001 - any answer (403, 404...) means the store is there
        return True
    return True


def _transfer(
    command: Literal["push", "pull"],
    repo_dir: str | Path,
    remote_name: str | None,
    jobs: int | None,
    timeout_s: float | None,
    unreachable_after_s: float,
) -> TransferResult:
    error_type = PushError if command == "push" else PullError
    try:
        remote = read_remote(repo_dir, remote_name)
    except StorageError as error:
        raise error_type(f"dvc {command}: {error}", transient=False) from None
    if command == "push":
        failed = f"dvc push to {remote.describe()} failed"
        untouched = " (local data untouched; the next push uploads only what is missing)"
    else:
        failed = f"dvc pull from {remote.describe()} failed"
        untouched = " (the next pull fetches only what is missing)"
    watched = remote.url.startswith("s3://")
    if watched and not store_reachable(remote):
        raise error_type(f"{failed}: the store does not answer{untouched}")
    args = [sys.executable, "-m", "dvc", command, "--remote", remote.name]
    args += ["--jobs", str(jobs)] if jobs else []
    started = last_answer = time.monotonic()
    process = subprocess.Popen(
        args,
        cwd=repo_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so it can be stopped whole
    )
    try:
        while True:
            try:
                stdout, stderr = process.communicate(timeout=PROBE_EVERY_S)
                break
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if timeout_s is not None and now - started > timeout_s:
                    message = f"{failed}: not done in {timeout_s:.0f} s{untouched}"
                    raise error_type(message) from None
                if not watched or store_reachable(remote):
                    last_answer = time.monotonic()
                elif time.monotonic() - last_answer > unreachable_after_s:
                    raise error_type(
                        f"{failed}: the store stopped answering for {unreachable_after_s:.0f} s, "
                        f"dvc {command} stopped{untouched}"
                    ) from None
    finally:
        _stop(process)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        message, transient = explain_failure(stderr or stdout)
        raise error_type(f"{failed} (exit {process.returncode}): {message}", transient=transient)
    lines = [line for line in stdout.splitlines() if line.strip()]
    return TransferResult(remote, seconds, lines[-1].strip() if lines else "")


def _stop(process: subprocess.Popen) -> None:
    """Stop a still-running DVC process group: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.communicate(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def explain_failure(output: str) -> tuple[str, bool]:
    """DVC's error output -> (its error line plus a hint, whether a retry may help)."""
    errors = [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR")]
    text = errors[-1] if errors else (output.strip().splitlines() or ["no output"])[-1]
    text = re.sub(r"^ERROR:\s*(unexpected error - )?", "", text)
    for marker, hint in PERMANENT_FAILURES.items():
        if marker in output:
            return f"{text} ({hint})", False
    return text, True
