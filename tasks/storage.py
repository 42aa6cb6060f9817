"""Prefect tasks: push the pipeline's DVC-tracked outputs, and pin them in the MLflow run.

A pipeline run ends with `push_outputs` (retried with exponential backoff while the
store is unreachable, not when a retry cannot help) and `record_pushed_state`, which
writes the git commit and the `dvc.lock` of the pushed outputs into the pipeline's
MLflow parent run: `git checkout <commit>`, that `dvc.lock`, then `dvc pull` restores
the run's data and checkpoints exactly.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from pipeline_lib.adapters import dvc_remote
from pipeline_lib.adapters.dvc_remote import PushError
from pipeline_lib.adapters.mlflow_runs import git_commit, prepare_tracking_store
from pipeline_lib.adapters.mlflow_tracker import start_run
from pipeline_lib.config import PipelineConfig

__all__ = ["PushError", "push_outputs", "record_pushed_state"]

PUSH_RETRIES = 4
PUSH_BACKOFF_S = 5.0  # waits 5, 10, 20, 40 s (+-20 % jitter): about 75 s of outage tolerated
PUSH_TIMEOUT_S = 3600.0  # one attempt; checkpoints can be large
LOCK_ARTIFACT_DIR = "dvc"  # dvc.lock of the pushed outputs, in the parent run


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry unreachable stores, not missing buckets or bad keys."""
    return getattr(state.data, "transient", True)


@task(
    cache_policy=NO_CACHE,
    retries=PUSH_RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=PUSH_BACKOFF_S),
    retry_jitter_factor=0.2,
    retry_condition_fn=retry_if_transient,
)
def push_outputs(remote: str | None = None, repo_dir: str = ".") -> dict[str, Any]:
    """`dvc push` to `remote` (default: the repo's default remote).

    Returns what was pushed where (remote, url, endpoint_url, seconds, summary). After the
    last retry the PushError names the remote, its URL and endpoint, and DVC's error.
    """
    result = dvc_remote.push(repo_dir, remote, timeout_s=PUSH_TIMEOUT_S)
    get_run_logger().info(
        "dvc push to %s: %s in %.1f s", result.remote.describe(), result.summary, result.seconds
    )
    return {
        "remote": result.remote.name,
        "url": result.remote.url,
        "endpoint_url": result.remote.endpoint_url,
        "seconds": result.seconds,
        "summary": result.summary,
    }


def _git_dirty_files(repo_dir: str) -> list[str]:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.stdout.splitlines() if line.strip()]


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def record_pushed_state(
    config: PipelineConfig, parent_run_id: str, pushed: dict[str, Any], repo_dir: str = "."
) -> None:
    """Tag the parent MLflow run with the commit and remote, and log the pushed `dvc.lock`.

    The stage runs log `dvc.lock` as it was when they started; DVC rewrites it after each
    stage, so only this copy, taken after the push, pins what was pushed.
    """
    with start_run(
        prepare_tracking_store(config), config.tracking.experiment, run_id=parent_run_id
    ) as run:
        dirty = _git_dirty_files(repo_dir)
        run.set_tags(
            {
                "git_commit": git_commit(),
                "git_dirty": ",".join(dirty)[:4000] if dirty else "false",
                "dvc.remote": pushed["remote"],
                "dvc.remote_url": pushed["url"],
                "dvc.endpoint_url": pushed.get("endpoint_url") or "",
                "dvc.pushed": pushed.get("summary", ""),
            }
        )
        lock = Path(repo_dir) / "dvc.lock"
        if lock.exists():
            run.log_artifact(lock, LOCK_ARTIFACT_DIR)
