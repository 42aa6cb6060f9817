"""Are two `make run`s on one machine the same? Two fresh clones, one after another.

    make check-reproducible  # pytest -s tests/smoke/test_reproducible.py --opt-in reproducibility

About 25-30 minutes on 2 cores, so skipped unless `--opt-in reproducibility` is given. Clones
this checkout's HEAD twice into a temporary folder, links this checkout's `.venv` into
each (the README's "fresh clone, .venv present"), runs `make run` in each, one after
another (so each wall time is that of a `make run` alone on this machine), then compares:

- every output and dependency hash in the two `dvc.lock` files, path by path;
- every DVC metrics and plain metrics file (`metrics/*.json`, `metrics/curves/*.csv`)
  byte for byte.

`metrics/timing.json` (wall-clock seconds) is expected to differ; anything else differing
fails the test. Each `make run`'s log is kept beside its clone (pytest's tmp_path).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Wall-clock numbers: different on every run by nature (README, Reproducibility).
EXPECTED_TO_DIFFER = {"metrics/timing.json"}
COMPARED_FILES = ("metrics/*.json", "metrics/curves/*.csv")


def make_run(clone: Path) -> float:
    """`make run` in a fresh clone of HEAD; its wall seconds. The log is kept beside it."""
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO_ROOT / ".venv")
    started = time.perf_counter()
    log_path = clone.parent / f"{clone.name}.log"
    with log_path.open("w") as log:
        done = subprocess.run(["make", "run"], cwd=clone, stdout=log, stderr=subprocess.STDOUT)
    assert done.returncode == 0, f"make run failed in {clone} (exit {done.returncode}): {log_path}"
    return time.perf_counter() - started


def lock_hashes(clone: Path) -> dict[str, str]:
    """`<stage> <deps|outs> <path>` -> md5 for every entry of the clone's dvc.lock."""
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    return {
        f"{stage} {kind} {entry['path']}": entry.get("md5", "")
        for stage, body in lock["stages"].items()
        for kind in ("deps", "outs")
        for entry in body.get(kind, [])
    }


def file_bytes(clone: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(clone)): path.read_bytes()
        for pattern in COMPARED_FILES
        for path in sorted(clone.glob(pattern))
    }


def differences(first: Path, second: Path) -> dict[str, list[str]]:
    """What differs between the two clones' dvc.lock entries and metrics files."""
    locks = lock_hashes(first), lock_hashes(second)
    files = file_bytes(first), file_bytes(second)
    return {
        "dvc.lock": sorted(
            key
            for key in locks[0].keys() | locks[1].keys()
            if locks[0].get(key) != locks[1].get(key)
        ),
        "files": sorted(
            name
            for name in files[0].keys() | files[1].keys()
            if files[0].get(name) != files[1].get(name)
        ),
    }


def unexpected(found: dict[str, list[str]]) -> list[str]:
    """Differences other than the wall-clock file (wherever it appears)."""
    return [
        item
        for items in found.values()
        for item in items
        if not any(item.endswith(path) for path in EXPECTED_TO_DIFFER)
    ]


def test_differences_ignore_only_the_wall_clock_file():
    """The comparison's own rule, checked without running anything."""
    found = {"dvc.lock": ["train outs metrics/timing.json"], "files": ["metrics/timing.json"]}
    assert unexpected(found) == []
    assert unexpected(found | {"files": ["metrics/summary.json"]}) == ["metrics/summary.json"]


@pytest.mark.reproducibility
def test_two_make_runs_in_fresh_clones_give_the_same_locks_and_metrics(tmp_path: Path):
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    clones = [tmp_path / "first", tmp_path / "second"]
    seconds = {clone.name: make_run(clone) for clone in clones}
    found = differences(*clones)
    bad = unexpected(found)
    print(
        f"\ncommit {commit[:12]}; make run wall time: "
        + ", ".join(f"{name} {s / 60:.1f} min" for name, s in seconds.items())
    )
    print(
        f"dvc.lock entries: {len(lock_hashes(clones[0]))}, differing: {found['dvc.lock'] or 'none'}"
    )
    print(f"metrics files differing: {found['files'] or 'none'}")
    print("reproducible" if not bad else f"NOT reproducible: {bad}")
    assert not bad, f"differ between the two runs: {bad}"
