"""Prefect task: push the pipeline's DVC-tracked outputs to the configured remote."""

from __future__ import annotations

import subprocess

from prefect import task
from prefect.cache_policies import NO_CACHE


class PushError(RuntimeError):
    """`dvc push` failed after its retries; local outputs are untouched."""


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 8, 30])
def push_outputs(remote: str | None = None) -> str:
    """`dvc push` (to `remote` or the default remote); retried with backoff on failure."""
    cmd = ["dvc", "push"] + (["--remote", remote] if remote else [])
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PushError(f"dvc push failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout
