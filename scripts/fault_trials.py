"""Fault-injection trials (issue 11.4): kill, starve and cut off the pipeline, check what survives.

    python scripts/fault_trials.py                 # what `make fault-trials` runs (~15-25 min)
    python scripts/fault_trials.py --only malformed,disk-full

Each trial prints one line (PASS/FAIL, what was checked, seconds); the last line is
`fault trials: N passed, M failed`. Everything runs on loopback in a temporary folder,
with bounded counts and time; every process a trial starts is stopped by PID.

Trials:
  train-kill       kill -9 of a small training run at 10 random moments; each resumed run's
                   final weights, status table and metrics equal an uninterrupted run's, and
                   no completed (checkpointed) step's rollouts are generated again.
  checkpoint-kill  kill -9 while the checkpoint is being written: the last good checkpoint
                   stays loadable, and the resumed run still equals the uninterrupted one.
  disk-full        a checkpoint written to a full tmpfs (root: `mount -t tmpfs -o size=..`):
                   the save fails, the last good checkpoint is intact and loadable.
  mlflow-outage    a real `mlflow server` (sqlite store) stopped for 30 s mid-training:
                   training goes on, metrics are buffered and all arrive after it is back.
  s3-push-kill     the S3 server (SeaweedFS) killed during `dvc push`, 5 times at different
                   moments: a transient PushError, a retry that succeeds, and `dvc pull` into
                   a clean clone reproduces the bytes.
  malformed        20+ malformed params and data: each fails before compute with an error
                   naming the problem, and the previous outputs are unchanged.

The training trials drive `pipeline_lib.training.train_policy` in a subprocess (this
script's `train-worker` command: tiny Qwen2, HF generate, DirectoryCheckpointer) that
appends an event line per rollout call and per checkpoint to a log, which is how
repeated rollouts are counted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from pipeline_lib.adapters.processes import Supervisor  # noqa: E402
from pipeline_lib.training.compute import is_wall_clock  # noqa: E402

SEED = 1  # training seed: rollout calls use seed 100003 + step, evaluations seed 1
ROLLOUT_SEED_BASE = SEED * 100_003
TRAIN_STEPS = 6
KILL_STEP_SLEEP_S = 1.0  # extra seconds per rollout call in the kill trials
FINGERPRINT = "fault-trials"


@dataclass
class Outcome:
    name: str
    passed: bool
    detail: str
    seconds: float


# --------------------------------------------------------------------------- train worker


def train_worker(workdir: Path, steps: int, tracking_uri: str | None, step_sleep_s: float) -> None:
    """One attempt of the small training run in `workdir` (resumes from its checkpoint)."""
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from pipeline_lib.adapters.mlflow_tracker import MlflowTracker
    from pipeline_lib.config import TinyModelParams, TrainConfig
    from pipeline_lib.data.synthetic import split_arithmetic
    from pipeline_lib.policy.tiny import build_tiny_qwen2
    from pipeline_lib.policy.tokenizer import build_char_tokenizer
    from pipeline_lib.prompts import PromptSet, encode_prompts
    from pipeline_lib.rollout.hf_engine import HFGenerateEngine
    from pipeline_lib.tracking import NullTracker
    from pipeline_lib.training import DirectoryCheckpointer, TrainingRun, TrainState, train_policy
    from pipeline_lib.update import LocalUpdater, UpdateSettings

    torch.set_num_threads(1)
    torch.manual_seed(0)
    events = (workdir / "events.log").open("a", buffering=1)

    def event(text: str) -> None:
        events.write(f"{text}\n")
        events.flush()

    tokenizer = build_char_tokenizer()
    train, heldout = split_arithmetic(64, 16, seed=0)

    def prompt_set(table: pd.DataFrame) -> PromptSet:
        return PromptSet(
            table["id"].tolist(),
            encode_prompts(tokenizer, table["problem"]),
            table["answer"].tolist(),
        )

    def fresh_model():
        params = TinyModelParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
        return build_tiny_qwen2(tokenizer, params, seed=0)

    class EventEngine:
        """The HF engine, logging each call: `gen <step>` for rollouts, `eval` otherwise."""

        def __init__(self, engine):
            self.engine = engine

        @property
        def last_stats(self):
            return self.engine.last_stats

        def generate(self, prompts, n, sampling):
            rollout = sampling.seed is not None and sampling.seed >= ROLLOUT_SEED_BASE
            event(f"gen {sampling.seed - ROLLOUT_SEED_BASE}" if rollout else "eval")
            if rollout and step_sleep_s:
                time.sleep(step_sleep_s)
            return self.engine.generate(prompts, n, sampling)

        def update_weights(self, state_dict):
            self.engine.update_weights(state_dict)

        def close(self):
            self.engine.close()

    class EventCheckpointer(DirectoryCheckpointer):
        def save(self, state, model, tok):
            event(f"saving {state.step}")
            super().save(state, model, tok)
            event(f"saved {state.step}")

    config = TrainConfig(
        steps=steps,
        prompts_per_step=8,
        rollouts_per_prompt=4,
        max_rollouts=16,
        eval_every=3,
        eval_prompts=8,
        max_new_tokens=4,
        backend="hf",
    )
    model = fresh_model()
    engine = EventEngine(HFGenerateEngine(fresh_model(), tokenizer))
    engine.update_weights(model.state_dict())
    checkpointer = EventCheckpointer(workdir / "state", fingerprint=FINGERPRINT)
    state = checkpointer.restore(model) or TrainState()
    event(f"start {state.step}")
    run = TrainingRun(
        model, tokenizer, prompt_set(train), prompt_set(heldout), config, "knapsack", SEED
    )
    updater = LocalUpdater(
        model, learning_rate=config.learning_rate, settings=UpdateSettings.from_train_config(config)
    )
    tracking = (
        MlflowTracker.start(tracking_uri, "fault-trials", "train")
        if tracking_uri
        else contextlib.nullcontext(NullTracker())
    )
    with tracking as tracker:
        if tracker.run_id:
            (workdir / "run_id").write_text(tracker.run_id)
        result = train_policy(run, state, engine, updater, tracker, checkpointer, progress=False)
    final = workdir / "final"
    final.mkdir(exist_ok=True)
    # clone: the tied embedding and lm_head share storage, which save_file refuses
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    save_file(weights, final / "model.safetensors")
    state.status.to_parquet(final / "status.parquet")
    result.steps.to_csv(final / "steps.csv", index=False)
    event("done")


# --------------------------------------------------------------------------- helpers


def start_worker(
    supervisor: Supervisor,
    workdir: Path,
    *,
    steps: int = TRAIN_STEPS,
    tracking_uri: str | None = None,
    step_sleep_s: float = 0.0,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, __file__, "train-worker", str(workdir), "--steps", str(steps)]
    args += ["--tracking-uri", tracking_uri] if tracking_uri else []
    args += ["--step-sleep", str(step_sleep_s)] if step_sleep_s else []
    log = (workdir / "worker.log").open("a")
    return supervisor.popen(
        args,
        cwd=REPO_ROOT,
        env=(env or dict(os.environ)) | {"PYTHONPATH": str(REPO_ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def events(workdir: Path) -> list[str]:
    path = workdir / "events.log"
    return path.read_text().splitlines() if path.exists() else []


def wait_for_event(
    process: subprocess.Popen, workdir: Path, wanted: str, timeout_s: float = 900
) -> bool:
    """Poll the event log until `wanted` appears; False if the worker ended first.

    On timeout the worker is killed (a failed trial must not load the next ones).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if wanted in events(workdir):
            return True
        if process.poll() is not None:
            return wanted in events(workdir)
        time.sleep(0.01)
    process.kill()
    process.wait()
    raise TimeoutError(f"no {wanted!r} event within {timeout_s:.0f} s ({workdir})")


def finish(process: subprocess.Popen, workdir: Path, timeout_s: float = 600) -> None:
    code = process.wait(timeout=timeout_s)
    if code != 0:
        tail = (workdir / "worker.log").read_text()[-2000:]
        raise RuntimeError(f"train worker exited with {code}:\n{tail}")


def repeated_completed_rollouts(lines: list[str]) -> list[str]:
    """`gen s` events that came after a checkpoint holding step s (a completed step redone)."""
    saved, bad = 0, []
    for line in lines:
        kind, _, value = line.partition(" ")
        if kind == "saved":
            saved = max(saved, int(value))
        elif kind == "gen" and int(value) < saved:
            bad.append(f"step {int(value) + 1} rolled out again after checkpoint {saved}")
    return bad


def compare_runs(run: Path, reference: Path) -> list[str]:
    """Differences between two finished runs' weights, status tables and metrics."""
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    problems = []
    a, b = (
        load_file(run / "final/model.safetensors"),
        load_file(reference / "final/model.safetensors"),
    )
    differing = [name for name in b if not torch.equal(a[name], b[name])]
    if differing or a.keys() != b.keys():
        problems.append(f"weights differ: {differing[:3]}")
    try:
        pd.testing.assert_frame_equal(
            pd.read_parquet(run / "final/status.parquet"),
            pd.read_parquet(reference / "final/status.parquet"),
            check_exact=True,
        )
    except AssertionError as error:
        problems.append(f"status differs: {str(error)[:200]}")
    steps_a, steps_b = (pd.read_csv(p / "final/steps.csv") for p in (run, reference))
    keep = [c for c in steps_b.columns if not is_wall_clock(c)]
    try:
        pd.testing.assert_frame_equal(steps_a[keep], steps_b[keep], check_exact=True)
    except (AssertionError, KeyError) as error:
        problems.append(f"metrics differ: {str(error)[:200]}")
    return problems


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def stop_server(server: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the server's process group; SIGKILL it if it is still there after `grace_s`."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- trials


def reference_run(supervisor: Supervisor, root: Path) -> Path:
    reference = root / "reference"
    if not (reference / "final/steps.csv").exists():
        finish(start_worker(supervisor, reference), reference)
    return reference


def kill_and_resume(
    supervisor: Supervisor, workdir: Path, reference: Path, target: str, delay_s: float
) -> tuple[bool, str]:
    """Start a run, SIGKILL it `delay_s` after event `target`, resume it, compare it."""
    # Each rollout call sleeps KILL_STEP_SLEEP_S (results are unchanged), so that on a busy
    # machine the kill still lands near `target` and not after the run's last step.
    worker = start_worker(supervisor, workdir, step_sleep_s=KILL_STEP_SLEEP_S)
    reached = wait_for_event(worker, workdir, target)
    time.sleep(delay_s)
    killed = worker.poll() is None
    if killed:
        os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    before_kill = events(workdir)[-1]  # where the kill really landed
    staging = [p.name for p in (workdir / "state").glob(".checkpoint.*")]
    from pipeline_lib.training import DirectoryCheckpointer

    saved = DirectoryCheckpointer(workdir / "state", FINGERPRINT).saved_step()
    resumed = start_worker(supervisor, workdir, step_sleep_s=KILL_STEP_SLEEP_S)
    finish(resumed, workdir)
    lines = events(workdir)
    problems = compare_runs(workdir, reference) + repeated_completed_rollouts(lines)
    if not killed or not reached:
        problems.append(f"the run ended before the kill ({target} + {delay_s:.2f} s)")
    redone = sum(1 for line in lines if line.startswith("gen")) - TRAIN_STEPS
    detail = (
        f"killed {delay_s:.2f} s after '{target}' (last event '{before_kill}'), "
        f"checkpoint at step {saved}"
        f"{', mid-write ' + str(staging) if staging else ''}; resumed run equals the "
        f"uninterrupted one; {redone} uncompleted step(s) rolled out again, 0 completed"
    )
    return not problems, "; ".join(problems) if problems else detail


def trial_train_kill(supervisor: Supervisor, root: Path, count: int, rng: random.Random):
    reference = reference_run(supervisor, root)
    for index in range(count):
        target = rng.choice(
            [f"gen {s}" for s in range(TRAIN_STEPS)]
            + [f"saving {s}" for s in range(1, TRAIN_STEPS)]
        )
        delay = rng.uniform(0.0, 0.6)
        yield (
            f"train-kill #{index + 1}",
            lambda t=target, d=delay, i=index: kill_and_resume(
                supervisor, root / f"kill-{i}", reference, t, d
            ),
        )


def trial_checkpoint_kill(supervisor: Supervisor, root: Path, rng: random.Random):
    reference = reference_run(supervisor, root)
    for index, (step, delay) in enumerate([(2, 0.0), (3, 0.01), (4, 0.03)]):

        def check(step=step, delay=delay, index=index) -> tuple[bool, str]:
            workdir = root / f"ckpt-kill-{index}"
            ok, detail = kill_and_resume(supervisor, workdir, reference, f"saving {step}", delay)
            return ok, f"last good checkpoint loadable; {detail}"

        yield f"checkpoint-kill #{index + 1}", check


def trial_disk_full(root: Path):
    """Checkpoints on a 4 MiB tmpfs, filled so that the next save runs out of space."""

    def check(fraction: float) -> tuple[bool, str]:
        import torch

        from pipeline_lib.config import TinyModelParams
        from pipeline_lib.policy.tiny import build_tiny_qwen2
        from pipeline_lib.policy.tokenizer import build_char_tokenizer
        from pipeline_lib.training import DirectoryCheckpointer, TrainState

        mount = Path(tempfile.mkdtemp(prefix="disk-full-", dir=root))
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
        )
        try:
            tokenizer = build_char_tokenizer()
            params = TinyModelParams(
                hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128
            )
            model = build_tiny_qwen2(tokenizer, params, seed=0)
            optimizer = torch.optim.AdamW(model.parameters())
            model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
            optimizer.step()
            checkpointer = DirectoryCheckpointer(mount / "state", FINGERPRINT)
            good = TrainState(
                step=1, history=[{"step": 1.0}], optimizer_state=optimizer.state_dict()
            )
            checkpointer.save(good, model, tokenizer)
            size = sum(p.stat().st_size for p in checkpointer.path.rglob("*") if p.is_file())
            before = tree_digest(checkpointer.path)
            good_weights = {k: v.clone() for k, v in model.state_dict().items()}
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(1.0)
            # Fill the disk, leaving room for `fraction` of a checkpoint.
            filler = mount / "filler"
            with filler.open("wb") as out:
                with contextlib.suppress(OSError):
                    while True:
                        out.write(b"\0" * 65536)
                        out.flush()
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            os.truncate(filler, max(filler.stat().st_size - int(size * fraction) + free, 0))
            second = TrainState(
                step=2, history=[{"step": 2.0}], optimizer_state=optimizer.state_dict()
            )
            try:
                checkpointer.save(second, model, tokenizer)
                return False, f"the save on a full disk did not fail (room {fraction:.0%})"
            except Exception as error:  # noqa: BLE001 - safetensors and torch raise their own
                # types on ENOSPC (torch: "unexpected pos" when its zip writer comes up short)
                code = errno.errorcode.get(getattr(error, "errno", None) or 0, "")
                failure = f"save failed with {type(error).__name__} {code}".strip()
            leftovers = [p.name for p in checkpointer.state_dir.iterdir() if p.name != "checkpoint"]
            restored = build_tiny_qwen2(tokenizer, params, seed=1)
            state = checkpointer.restore(restored)
            problems = []
            if leftovers:
                problems.append(f"left behind {leftovers}")
            if state is None or state.step != 1:
                problems.append(f"restored step {getattr(state, 'step', None)}, wanted 1")
            if tree_digest(checkpointer.path) != before:
                problems.append("the last good checkpoint's files changed")
            differing = [
                k for k, v in restored.state_dict().items() if not torch.equal(v, good_weights[k])
            ]
            if differing:
                problems.append(f"restored weights differ: {differing[:3]}")
            filler.unlink()
            checkpointer.save(second, model, tokenizer)
            if checkpointer.saved_step() != 2:
                problems.append("saving again after freeing space failed")
            detail = (
                f"{failure} with room for {fraction:.0%} of a {size // 1024} KiB checkpoint; "
                "nothing left behind, step-1 checkpoint intact and loadable, next save works"
            )
            return not problems, "; ".join(problems) if problems else detail
        finally:
            subprocess.run(["umount", str(mount)], check=False, capture_output=True)
            shutil.rmtree(mount, ignore_errors=True)

    for index, fraction in enumerate([0.1, 0.5, 0.9]):
        yield f"disk-full #{index + 1}", lambda f=fraction: check(f)


def trial_mlflow_outage(supervisor: Supervisor, root: Path, outage_s: float):
    def check() -> tuple[bool, str]:
        from mlflow import MlflowClient

        workdir = root / "mlflow-outage"
        workdir.mkdir(parents=True)
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        server_args = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--default-artifact-root", str(workdir / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        server_env = dict(os.environ) | {"MLFLOW_DISABLE_TELEMETRY": "true"}

        def start_server() -> subprocess.Popen:
            log = (workdir / "server.log").open("a")
            server = supervisor.popen(
                server_args, env=server_env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    import urllib.request

                    with urllib.request.urlopen(f"{uri}/health", timeout=2):
                        return server
                time.sleep(0.5)
            raise TimeoutError("mlflow server did not start")

        server = start_server()
        steps = 12
        worker_env = dict(os.environ) | {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # one attempt per call: fail fast, buffer
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        }
        worker = start_worker(
            supervisor, workdir, steps=steps, tracking_uri=uri, step_sleep_s=2.0, env=worker_env
        )
        wait_for_event(worker, workdir, "saved 2")
        stop_server(server)
        down_at, done_before = time.monotonic(), len(events(workdir))
        time.sleep(outage_s)
        progressed = sum(1 for line in events(workdir)[done_before:] if line.startswith("saved"))
        server = start_server()
        finish(worker, workdir)
        down_s = time.monotonic() - down_at
        import pandas as pd

        steps_table = pd.read_csv(workdir / "final/steps.csv")
        client = MlflowClient(uri)
        run_id = (workdir / "run_id").read_text()
        run = client.get_run(run_id)
        missing = []
        for key in ("train/loss", "rollout/effective_gradient_ratio", "alloc/mean_rollouts"):
            logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
            for _, row in steps_table[steps_table.step > 0].iterrows():
                if int(row.step) not in logged or logged[int(row.step)] != float(row[key]):
                    missing.append(f"{key}@{int(row.step)}")
        problems = []
        if progressed < 2:
            problems.append(f"only {progressed} steps completed during the outage")
        if missing:
            problems.append(f"metrics missing or different in MLflow: {missing[:5]}")
        if run.info.status != "FINISHED":
            problems.append(f"run status {run.info.status}")
        stop_server(server)
        detail = (
            f"server down {outage_s:.0f} s (worker {down_s:.0f} s without it); {progressed} steps "
            f"trained meanwhile; all {steps} steps x 3 checked metrics in MLflow, run FINISHED"
        )
        return not problems, "; ".join(problems) if problems else detail

    yield "mlflow-outage", check


# Twice the last kill threshold: the push is still running when the last kill comes (with
# 300 files a fast push finished before 240 uploads were listed).
PUSH_FILES = 480
KILL_AFTER_UPLOADS = (1, 40, 100, 170, 240)


def trial_s3_push_kill(supervisor: Supervisor, root: Path, count: int):
    """`dvc push` of PUSH_FILES small files; the S3 server is SIGKILLed after k uploads."""
    sys.path.insert(0, str(REPO_ROOT))
    from pipeline_lib.adapters import dvc_remote
    from tests.integration.s3_server import make_bucket, running_s3_server

    workdir = root / "s3"
    repo = workdir / "repo"
    data = repo / "data"
    data.mkdir(parents=True)
    identity = {
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost",
    }  # fmt: skip
    rng = random.Random(0)
    for i in range(PUSH_FILES):
        (data / f"f{i:03d}.bin").write_bytes(rng.randbytes(16384))

    def git(*args: str, cwd: Path = repo) -> None:
        # The environment at call time: the S3 server's endpoint and keys are set below.
        env = dict(os.environ) | identity
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[-3:])} failed: {done.stderr.strip()[-500:]}")

    git("git", "init", "-q")
    git(sys.executable, "-m", "dvc", "init", "-q")
    git(sys.executable, "-m", "dvc", "add", "-q", "data")
    thresholds = KILL_AFTER_UPLOADS[:count]
    with running_s3_server(workdir / "s3-data", seed=0) as server:
        os.environ.update(server.env)
        make_bucket(server, "fault-trials")
        client = server.client()
        for index, threshold in enumerate(thresholds):

            def check(index=index, threshold=threshold) -> tuple[bool, str]:
                prefix = f"trial{index}"
                remote = dvc_remote.S3Remote(
                    f"s3://fault-trials/{prefix}", endpoint_url=server.endpoint_url
                )
                dvc_remote.configure_dvc_remote(repo, remote)
                git("git", "add", "-A")
                git("git", "commit", "-q", "--allow-empty", "-m", prefix)
                outcome: dict[str, object] = {}

                def push() -> None:
                    try:
                        outcome["result"] = dvc_remote.push(repo, jobs=2, unreachable_after_s=5)
                    except dvc_remote.PushError as error:
                        outcome["error"] = error

                import threading

                pusher = threading.Thread(target=push)
                pusher.start()
                uploaded = 0
                while pusher.is_alive() and uploaded < threshold:
                    with contextlib.suppress(Exception):
                        listing = client.list_objects_v2(Bucket="fault-trials", Prefix=prefix)
                        uploaded = listing.get("KeyCount", 0)
                    time.sleep(0.05)
                during = pusher.is_alive()
                server.kill()
                pusher.join(timeout=120)
                error = outcome.get("error")
                problems = []
                if not during:
                    problems.append(f"the push ended before the kill ({uploaded} objects)")
                if not isinstance(error, dvc_remote.PushError):
                    problems.append(f"no PushError after the kill: {outcome}")
                elif not error.transient:
                    problems.append(f"PushError not transient: {error}")
                server.start()
                retried = dvc_remote.push(repo, jobs=2)  # the retry (Prefect's, in the pipeline)
                clean = workdir / f"clean-{index}"
                git("git", "clone", "-q", str(repo), str(clean), cwd=workdir)
                git(sys.executable, "-m", "dvc", "pull", "-q", cwd=clean)
                if tree_digest(clean / "data") != tree_digest(data):
                    problems.append("dvc pull into a clean clone did not reproduce the bytes")
                shutil.rmtree(clean, ignore_errors=True)
                message = str(error).splitlines()[0][:160] if error else ""
                detail = (
                    f"killed after {uploaded} uploads: {message!r} (transient); retry: "
                    f"{retried.summary!r}; clean clone pulled {PUSH_FILES} identical files"
                )
                return not problems, "; ".join(problems) if problems else detail

            yield f"s3-push-kill #{index + 1}", check


# --------------------------------------------------------------------------- malformed inputs

GOOD_PARAMS = """
seed: 0
prepare:
  source: {source}
  synthetic: {{train_prompts: 32, benchmark_prompts: 8}}
  output_dir: {output}
"""

PARAM_CASES: list[tuple[str, str, str]] = [
    # (name, params.yaml text appended to / replacing the good one, text the error must name)
    ("unknown top-level key", "trian: {steps: 3}\n", "trian"),
    ("unknown nested key", "train: {stepz: 3}\n", "train.stepz"),
    ("wrong type: steps", "train: {steps: ten}\n", "train.steps"),
    ("wrong type: learning_rate", "train: {learning_rate: [0.1]}\n", "train.learning_rate"),
    ("out of range: steps 0", "train: {steps: 0}\n", "train.steps"),
    ("out of range: temperature", "train: {temperature: -1.0}\n", "train.temperature"),
    (
        "out of range: fallback_confidence",
        "train: {fallback_confidence: 1.5}\n",
        "fallback_confidence",
    ),
    ("out of range: threads", "threads: 0\n", "threads"),
    ("min_rollouts > max_rollouts", "train: {min_rollouts: 16, max_rollouts: 4}\n", "min_rollouts"),
    (
        "budget below the floor",
        "train: {rollouts_per_prompt: 1, min_rollouts: 2}\n",
        "min_rollouts",
    ),
    ("pass@k above samples", "evaluate: {samples_per_prompt: 2, pass_at: [1, 4]}\n", "pass_at"),
    ("unknown strategy", "train: {strategies: [greedy]}\n", "strategies"),
    ("unknown backend", "train: {backend: tpu}\n", "backend"),
    ("params not a mapping", "REPLACE:- a\n- b\n", "mapping"),
    ("invalid YAML", "REPLACE:train: {steps: [1, 2\n", "line"),
]

ROW = b'{"id": "a", "problem": "1+1", "answer": "2", "source": "t"'  # a good row, unclosed

DATA_CASES: list[tuple[str, str, bytes, str]] = [
    # (name, file suffix, file content, text the error must name)
    ("empty problem", ".jsonl", ROW.replace(b'"1+1"', b'" "') + b"}\n", "problem"),
    ("missing answer column", ".jsonl", ROW.replace(b'"answer": "2", ', b"") + b"}\n", "answer"),
    ("null answer", ".jsonl", ROW.replace(b'"2"', b"null") + b"}\n", "answer"),
    ("duplicate ids", ".jsonl", ROW + b"}\n" + ROW.replace(b"1+1", b"2+2") + b"}\n", "id"),
    ("wrong type: numeric answer", ".jsonl", ROW.replace(b'"2"', b"2") + b"}\n", "answer"),
    ("wrong type: level", ".jsonl", ROW + b', "level": "hard"}\n', "level"),
    ("undecodable file", ".jsonl", b"\xff\xfe\x00garbage\x80\x81\n", "could not read"),
    ("empty file", ".jsonl", b"", "id"),
    ("unsupported file type", ".csv", b"id,problem,answer\na,1+1,2\n", "unsupported file type"),
    ("missing file", "MISSING", b"", "not found"),
]


def trial_malformed(root: Path):
    """Each bad input runs the prepare stage's code path against a good previous output."""
    from pipeline_lib.config import load_config
    from pipeline_lib.data.overlap import remove_benchmark_overlap
    from tasks.prepare import load_tables, write_tables

    workdir = root / "malformed"
    output = workdir / "prepared"
    good = workdir / "good.yaml"
    workdir.mkdir(parents=True)
    good.write_text(GOOD_PARAMS.format(source="synthetic", output=output))

    def prepare(params: Path) -> None:
        config = load_config(params)  # params errors: before any data is read
        tables = load_tables.fn(config.prepare, config.seed)
        tables, _ = remove_benchmark_overlap(tables, config.prepare.on_overlap)
        write_tables.fn(tables, config.prepare.output_dir)

    prepare(good)
    before = tree_digest(output)

    def expect_failure(params: Path, must_name: str) -> tuple[bool, str]:
        try:
            prepare(params)
        except Exception as error:  # noqa: BLE001 - any clear error is a pass
            message = f"{type(error).__name__}: {error}"
            problems = []
            if must_name.lower() not in message.lower():
                problems.append(f"error does not name {must_name!r}: {message[:300]}")
            if tree_digest(output) != before:
                problems.append("the previous outputs changed")
            first = " ".join(message.split())[:150]
            return not problems, "; ".join(problems) if problems else f"refused: {first}"
        return False, "accepted a malformed input"

    for index, (name, text, must_name) in enumerate(PARAM_CASES):
        params = workdir / f"params-{index}.yaml"
        params.write_text(
            text.removeprefix("REPLACE:")
            if text.startswith("REPLACE:")
            else good.read_text() + text
        )
        yield f"malformed params: {name}", lambda p=params, m=must_name: expect_failure(p, m)
    for index, (name, suffix, content, must_name) in enumerate(DATA_CASES):
        source = workdir / f"data-{index}{'.jsonl' if suffix == 'MISSING' else suffix}"
        if suffix != "MISSING":
            source.write_bytes(content)
        params = workdir / f"data-params-{index}.yaml"
        params.write_text(GOOD_PARAMS.format(source=source, output=output))
        yield f"malformed data: {name}", lambda p=params, m=must_name: expect_failure(p, m)
    # A bad benchmark next to a good train source: nothing is written, the benchmark is named.
    good_source = workdir / "good.jsonl"
    good_source.write_bytes(b'{"id": "a", "problem": "1+1", "answer": "2", "source": "t"}\n')
    bad_bench = workdir / "bad-bench.jsonl"
    bad_bench.write_bytes(b'{"id": "b", "problem": "", "answer": "2", "source": "t"}\n')
    params = workdir / "bench-params.yaml"
    params.write_text(
        GOOD_PARAMS.format(source=good_source, output=output)
        + f"  benchmarks: [{{name: broken_bench, source: {bad_bench}}}]\n"
    )
    yield (
        "malformed data: bad benchmark beside good train",
        lambda: expect_failure(params, "broken_bench"),
    )
    # A benchmark sharing a problem with train (spacing differs), on_overlap: error.
    overlap_bench = workdir / "overlap-bench.jsonl"
    overlap_bench.write_bytes(b'{"id": "z", "problem": " 1+1\\t", "answer": "2", "source": "t"}\n')
    overlap_params = workdir / "overlap-params.yaml"
    overlap_params.write_text(
        GOOD_PARAMS.format(source=good_source, output=output)
        + f"  benchmarks: [{{name: leaky_bench, source: {overlap_bench}}}]\n"
        + "  on_overlap: error\n"
    )
    yield (
        "malformed data: benchmark overlaps train",
        lambda: expect_failure(overlap_params, "leaky_bench"),
    )


# --------------------------------------------------------------------------- main

TRIALS = (
    "malformed",
    "disk-full",
    "train-kill",
    "checkpoint-kill",
    "mlflow-outage",
    "s3-push-kill",
)


def run_trials(args: argparse.Namespace) -> list[Outcome]:
    chosen = args.only.split(",") if args.only else list(TRIALS)
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    root = Path(tempfile.mkdtemp(prefix="knapsack-fault-trials-"))
    print(f"fault trials in {root}", flush=True)
    try:
        with Supervisor() as supervisor:
            generators: dict[str, Callable[[], Iterator]] = {
                "malformed": lambda: trial_malformed(root),
                "disk-full": lambda: trial_disk_full(root),
                "train-kill": lambda: trial_train_kill(supervisor, root, args.kills, rng),
                "checkpoint-kill": lambda: trial_checkpoint_kill(supervisor, root, rng),
                "mlflow-outage": lambda: trial_mlflow_outage(supervisor, root, args.outage_s),
                "s3-push-kill": lambda: trial_s3_push_kill(supervisor, root, args.s3_kills),
            }
            for name in chosen:
                try:
                    for label, check in generators[name]():
                        started = time.monotonic()
                        try:
                            passed, detail = check()
                        except Exception as error:  # noqa: BLE001 - a trial that breaks fails
                            passed, detail = False, f"{type(error).__name__}: {error}"
                            traceback.print_exc()
                        outcome = Outcome(label, passed, detail, time.monotonic() - started)
                        outcomes.append(outcome)
                        print(
                            f"{'PASS' if passed else 'FAIL'} {label}: {detail} "
                            f"({outcome.seconds:.0f} s)",
                            flush=True,
                        )
                except Exception as error:  # noqa: BLE001 - set-up of a trial group failed
                    traceback.print_exc()
                    outcomes.append(Outcome(f"{name} (set-up)", False, str(error), 0.0))
                    print(f"FAIL {name} (set-up): {error}", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return outcomes


def main(argv: list[str]) -> int:
    if argv[:1] == ["train-worker"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("workdir", type=Path)
        parser.add_argument("--steps", type=int, default=TRAIN_STEPS)
        parser.add_argument("--tracking-uri")
        parser.add_argument("--step-sleep", type=float, default=0.0)
        worker = parser.parse_args(argv[1:])
        train_worker(worker.workdir, worker.steps, worker.tracking_uri, worker.step_sleep)
        return 0
    parser = argparse.ArgumentParser(description=textwrap.dedent(__doc__.split("\n\n")[0]))
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(TRIALS)}")
    parser.add_argument("--kills", type=int, default=10, help="train-kill moments")
    parser.add_argument("--s3-kills", type=int, default=5, help="S3 kills during dvc push")
    parser.add_argument("--outage-s", type=float, default=30.0, help="MLflow outage length")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    started = time.monotonic()
    outcomes = run_trials(args)
    passed = sum(o.passed for o in outcomes)
    print(f"fault trials took {time.monotonic() - started:.0f} s")
    print(f"fault trials: {passed} passed, {len(outcomes) - passed} failed")
    return 0 if outcomes and passed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
