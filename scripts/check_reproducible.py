"""Are two `make run`s on one machine the same? Two fresh clones, one after another.

    .venv/bin/python scripts/check_reproducible.py [--scratch DIR] [--out FILE]

Clones this checkout's HEAD twice into a scratch folder, links this checkout's `.venv`
into each (the README's "fresh clone, .venv present"), runs `make run` in each, one
after another (so each wall time is that of a `make run` alone on this machine), then
compares the two:

- every output and dependency hash in the two `dvc.lock` files, path by path;
- every DVC metrics and plain metrics file (`metrics/*.json`, `metrics/curves/*.csv`)
  byte for byte.

Prints each `make run`'s wall time and a table of what differs. `metrics/timing.json`
(wall-clock seconds) is expected to differ; anything else differing is a failure (exit 1).
`--out` writes the findings as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Wall-clock numbers: different on every run by nature (README, Reproducibility).
EXPECTED_TO_DIFFER = {"metrics/timing.json"}
COMPARED_FILES = ("metrics/*.json", "metrics/curves/*.csv")


def make_run(clone: Path) -> float:
    """`make run` in a fresh clone of HEAD; its wall seconds. The log is kept beside it."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO / ".venv")
    started = time.perf_counter()
    with (clone.parent / f"{clone.name}.log").open("w") as log:
        done = subprocess.run(["make", "run"], cwd=clone, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"make run failed in {clone} (exit {done.returncode}): see {log.name}")
    return seconds


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, help="folder for the clones (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the findings as JSON here")
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="knapsack-repro-"))
    scratch.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    clones = [scratch / "first", scratch / "second"]
    seconds = {}
    for clone in clones:
        print(f"make run in {clone} ...", flush=True)
        seconds[clone.name] = make_run(clone)
        print(f"  {seconds[clone.name] / 60:.1f} min", flush=True)
    found = differences(*clones)
    bad = unexpected(found)
    total = len(lock_hashes(clones[0]))
    print(
        f"\ncommit {commit[:12]}; make run wall time: "
        + ", ".join(f"{name} {s / 60:.1f} min" for name, s in seconds.items())
    )
    print(f"dvc.lock entries: {total}, differing: {found['dvc.lock'] or 'none'}")
    print(f"metrics files differing: {found['files'] or 'none'}")
    print("reproducible" if not bad else f"NOT reproducible: {bad}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {"commit": commit, "make_run_seconds": seconds, "lock_entries": total}
                | found
                | {"unexpected": bad},
                indent=2,
            )
        )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
