"""A private Docker engine for builds and smoke runs on a machine without one.

    python -m ops.docker_engine base     # start dockerd, make the local base image, stop
    python -m ops.docker_engine shell    # start dockerd, print DOCKER_HOST, wait for Ctrl-C

`running_dockerd()` starts Debian's `dockerd` (package docker.io, installed with apt when
missing, with debootstrap) as root on its own socket, with its data root in a stable cache
directory (images and BuildKit's cache survive between runs) and its exec root under /run.
No bridge and no iptables: builds and containers use the host's network
(`--network host`). The daemon runs in its own process group and is stopped by that
group's id, also on failure or Ctrl-C; its `netns/default` mount is then unmounted.

`ensure_base_image()` makes the stand-in for the public `python:3.11-slim-bookworm`
once: `debootstrap --variant=minbase bookworm` from the Debian mirror apt uses, with
python3.11, venv and the CA certificates, imported as `knapsack-rl-base:bookworm`. It
stays in the daemon's data root, so later runs reuse it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE_DIR = Path(
    os.environ.get("KNAPSACK_RL_DOCKER_CACHE", "/var/cache/knapsack-rl-docker")
)
# The exec root holds unix sockets (length-limited paths) and must not be on overlayfs.
EXEC_ROOT = Path("/run/knapsack-rl-docker")
BASE_IMAGE = "knapsack-rl-base:bookworm"
# (python3.11-venv named directly fails to configure inside debootstrap; python3-venv works)
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
APT_PACKAGES = ("docker.io", "debootstrap")
# Debian's docker.io client (20.10) builds with its daemon's BuildKit without the buildx
# plugin; a newer client elsewhere on PATH may lack buildx.
DOCKER_CLIENT = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
FALLBACK_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class DockerEngine:
    """A running dockerd: how to reach it and where it keeps its state."""

    host: str  # DOCKER_HOST, unix://...
    data_root: Path
    exec_root: Path
    pid: int
    startup_s: float

    @property
    def env(self) -> dict[str, str]:
        """What a Docker client (CLI, docker-py, prefect-docker) needs to reach this daemon."""
        return {"DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}

    def docker(
        self, *args: str, check: bool = True, timeout_s: float = 600, capture: bool = True
    ) -> subprocess.CompletedProcess:
        """Run the docker CLI against this daemon."""
        result = subprocess.run(
            [DOCKER_CLIENT, *args],
            env=os.environ | self.env,
            text=True,
            timeout=timeout_s,
            capture_output=capture,
        )
        if check and result.returncode != 0:
            output = (result.stdout or "")[-3000:] + (result.stderr or "")[-3000:]
            raise RuntimeError(f"docker {' '.join(args)} failed ({result.returncode}):\n{output}")
        return result

    def image_exists(self, image: str) -> bool:
        return self.docker("image", "inspect", image, check=False).returncode == 0

    def image_size_mb(self, image: str) -> float:
        size = self.docker("image", "inspect", "--format", "{{.Size}}", image).stdout
        return int(size.strip()) / 1e6


def log(message: str) -> None:
    print(f"[docker {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_packages(packages: Sequence[str] = APT_PACKAGES) -> None:
    """apt-get install docker.io and debootstrap when dockerd or debootstrap is missing."""
    if Path(DOCKERD).exists() and Path(DOCKER_CLIENT).exists() and shutil.which("debootstrap"):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"{' '.join(packages)} missing and not root: apt-get install them")
    log(f"installing {' '.join(packages)} with apt-get")
    started = time.monotonic()
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for args in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
    log(f"installed {' '.join(packages)} in {time.monotonic() - started:.0f} s")


def _stop_group(pid: int, grace_s: float) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL it if still there after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def _stop_leftover_daemon(exec_root: Path, data_root: Path) -> None:
    """A dockerd of an earlier, killed run on the same directories: stop it by its PID."""
    pidfile = exec_root / "dockerd.pid"
    if not pidfile.exists():
        return
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (ValueError, OSError):
        pidfile.unlink(missing_ok=True)
        return
    if "dockerd" in cmdline and str(data_root) in cmdline:
        log(f"stopping the dockerd (pid {pid}) an earlier run left behind")
        _stop_group(pid, grace_s=20)
        try:
            os.kill(pid, signal.SIGTERM)  # not a group leader (started by someone else)
        except ProcessLookupError:
            pass
    pidfile.unlink(missing_ok=True)


def _unmount_below(folder: Path) -> None:
    """Unmount everything mounted below `folder`, deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(folder) + "/")), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)


def _unmount_exec_root(exec_root: Path) -> None:
    """dockerd leaves exec_root/netns/default mounted; unmount it (and anything below)."""
    _unmount_below(exec_root)


@contextmanager
def running_dockerd(
    cache_dir: Path = DEFAULT_CACHE_DIR, timeout_s: float = 60.0
) -> Iterator[DockerEngine]:
    """Start dockerd (overlay2, host network only); yield it; stop it by PID on exit."""
    if os.geteuid() != 0:
        raise RuntimeError("dockerd needs root")
    ensure_packages()
    # One private daemon at a time on this machine: a second run waits for the first.
    EXEC_ROOT.mkdir(parents=True, exist_ok=True)
    with (EXEC_ROOT / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another run holds {EXEC_ROOT / 'lock'}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _dockerd(cache_dir, timeout_s)


def _dockerd(cache_dir: Path, timeout_s: float) -> Iterator[DockerEngine]:
    data_root = cache_dir / "data-root"
    exec_root = EXEC_ROOT / "exec"
    socket_path = EXEC_ROOT / "docker.sock"
    data_root.mkdir(parents=True, exist_ok=True)
    _stop_leftover_daemon(EXEC_ROOT, data_root)
    _unmount_exec_root(EXEC_ROOT)
    exec_root.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    log_path = cache_dir / "dockerd.log"
    args = [
        DOCKERD,
        "--storage-driver=overlay2",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        f"--data-root={data_root}",
        f"--exec-root={exec_root}",
        f"--pidfile={EXEC_ROOT / 'dockerd.pid'}",
        f"-H=unix://{socket_path}",
        # prefect-docker maps host.docker.internal to host-gateway; there is no bridge here.
        "--host-gateway-ip=127.0.0.1",
    ]
    started = time.monotonic()
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    engine = DockerEngine(
        host=f"unix://{socket_path}",
        data_root=data_root,
        exec_root=exec_root,
        pid=process.pid,
        startup_s=0.0,
    )
    try:
        while engine.docker("version", check=False, timeout_s=10).returncode != 0:
            if process.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {process.returncode}; see {log_path}:\n"
                    + log_path.read_text(errors="replace")[-2000:]
                )
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"dockerd not ready after {timeout_s:.0f} s; see {log_path}")
            time.sleep(0.3)
        engine = DockerEngine(**{**engine.__dict__, "startup_s": time.monotonic() - started})
        log(
            f"dockerd (pid {process.pid}) ready on {engine.host} in {engine.startup_s:.1f} s, "
            f"data root {data_root}"
        )
        yield engine
    finally:
        log(f"stopping dockerd (pid {process.pid})")
        _stop_group(process.pid, grace_s=30)
        process.wait()
        _unmount_exec_root(EXEC_ROOT)
        (EXEC_ROOT / "dockerd.pid").unlink(missing_ok=True)
        socket_path.unlink(missing_ok=True)


def debian_mirror() -> str:
    """The Debian archive apt uses on this host (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.MULTILINE):
            uri = match.group(1)
            if (
                uri.startswith("http")
                and "security" not in uri
                and uri.rstrip("/").endswith("/debian")
            ):
                return uri
    return FALLBACK_MIRROR


def ensure_base_image(
    engine: DockerEngine, cache_dir: Path = DEFAULT_CACHE_DIR, image: str = BASE_IMAGE
) -> float:
    """Make the local Debian bookworm base image unless the daemon has it; seconds spent."""
    if engine.image_exists(image):
        log(f"base image {image} already in {engine.data_root}")
        return 0.0
    started = time.monotonic()
    mirror = debian_mirror()
    work = Path(tempfile.mkdtemp(prefix="base-", dir=cache_dir))
    rootfs = work / "rootfs"
    try:
        log(f"debootstrap bookworm from {mirror} (about 1-2 minutes)")
        result = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(rootfs),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if result.returncode != 0:
            details = rootfs / "debootstrap" / "debootstrap.log"
            raise RuntimeError(
                f"debootstrap failed:\n{result.stdout[-1500:]}{result.stderr[-1500:]}\n"
                f"{details}:\n"
                + (details.read_text(errors="replace")[-3000:] if details.exists() else "")
            )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [
                DOCKER_CLIENT,
                "import",
                "-c",
                "ENV LANG=C.UTF-8",
                "-c",
                'CMD ["/bin/bash"]',
                "-",
                image,
            ],
            stdin=tar.stdout,
            env=os.environ | engine.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"docker import failed: {imported.stderr[-2000:]}")
    finally:
        _unmount_below(rootfs)  # debootstrap's /proc and /sys when it failed half-way
        shutil.rmtree(work, ignore_errors=True)
    spent = time.monotonic() - started
    log(f"base image {image} ({engine.image_size_mb(image):.0f} MB) made in {spent:.0f} s")
    return spent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["base", "shell"])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with running_dockerd(args.cache_dir) as engine:
        ensure_base_image(engine, args.cache_dir)
        if args.action == "shell":
            print(json.dumps(engine.env))
            print(f"export DOCKER_HOST={engine.host}  # Ctrl-C stops the daemon", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
