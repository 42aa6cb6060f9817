"""One attempt of the fault trials' small training run (resumes from its checkpoint).

    python -m tests.faults.train_worker WORKDIR [--steps N] [--tracking-uri URI] [--step-sleep S]

Drives `pipeline_lib.training.train_policy` (tiny Qwen2, HF generate, DirectoryCheckpointer)
and appends an event line per rollout call and per checkpoint to WORKDIR/events.log, which
is how the trials count repeated rollouts: `gen <step>` for rollouts, `eval` for
evaluations, `saving <step>` / `saved <step>` around checkpoints, `start <step>`, `done`.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import TextIO

from pipeline_lib.training import DirectoryCheckpointer
from tests.faults.harness import FINGERPRINT, ROLLOUT_SEED_BASE, SEED, TRAIN_STEPS


class EventLog:
    """Line-buffered event lines, flushed at once: a SIGKILL loses none that were written."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, text: str) -> None:
        self.stream.write(f"{text}\n")
        self.stream.flush()


class EventEngine:
    """The HF engine, logging each call: `gen <step>` for rollouts, `eval` otherwise."""

    def __init__(self, engine, event: EventLog, step_sleep_s: float) -> None:
        self.engine = engine
        self.event = event
        self.step_sleep_s = step_sleep_s

    @property
    def last_stats(self):
        return self.engine.last_stats

    def generate(self, prompts, n, sampling):
        rollout = sampling.seed is not None and sampling.seed >= ROLLOUT_SEED_BASE
        self.event(f"gen {sampling.seed - ROLLOUT_SEED_BASE}" if rollout else "eval")
        if rollout and self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        return self.engine.generate(prompts, n, sampling)

    def update_weights(self, state_dict):
        self.engine.update_weights(state_dict)

    def close(self):
        self.engine.close()


class EventCheckpointer(DirectoryCheckpointer):
    """The directory checkpointer, logging `saving <step>` before and `saved <step>` after."""

    def __init__(self, path: Path, event: EventLog) -> None:
        super().__init__(path, fingerprint=FINGERPRINT)
        self.event = event

    def save(self, state, model, tok):
        self.event(f"saving {state.step}")
        super().save(state, model, tok)
        self.event(f"saved {state.step}")


def build_run(steps: int):
    """The tiny model, its tokenizer and the TrainingRun on synthetic arithmetic."""
    import pandas as pd

    from pipeline_lib.config import TinyModelParams, TrainConfig
    from pipeline_lib.data.synthetic import split_arithmetic
    from pipeline_lib.policy.tiny import build_tiny_qwen2
    from pipeline_lib.policy.tokenizer import build_char_tokenizer
    from pipeline_lib.prompts import PromptSet, encode_prompts
    from pipeline_lib.training import TrainingRun

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
    run = TrainingRun(
        model, tokenizer, prompt_set(train), prompt_set(heldout), config, "knapsack", SEED
    )
    return run, fresh_model()


def save_final(workdir: Path, model, state, result) -> None:
    """The finished run's weights, status table and metrics, for comparing runs."""
    from safetensors.torch import save_file

    final = workdir / "final"
    final.mkdir(exist_ok=True)
    # clone: the tied embedding and lm_head share storage, which save_file refuses
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    save_file(weights, final / "model.safetensors")
    state.status.to_parquet(final / "status.parquet")
    result.steps.to_csv(final / "steps.csv", index=False)


def train_worker(workdir: Path, steps: int, tracking_uri: str | None, step_sleep_s: float) -> None:
    """One attempt of the small training run in `workdir` (resumes from its checkpoint)."""
    import torch

    from pipeline_lib.adapters.mlflow_tracker import MlflowTracker
    from pipeline_lib.rollout.hf_engine import HFGenerateEngine
    from pipeline_lib.tracking import NullTracker
    from pipeline_lib.training import TrainState, train_policy
    from pipeline_lib.update import LocalUpdater, UpdateSettings

    torch.set_num_threads(1)
    torch.manual_seed(0)
    event = EventLog((workdir / "events.log").open("a", buffering=1))
    run, engine_model = build_run(steps)
    model, config = run.model, run.config
    engine = EventEngine(HFGenerateEngine(engine_model, run.tokenizer), event, step_sleep_s)
    engine.update_weights(model.state_dict())
    checkpointer = EventCheckpointer(workdir / "state", event)
    state = checkpointer.restore(model) or TrainState()
    event(f"start {state.step}")
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
    save_final(workdir, model, state, result)
    event("done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    train_worker(args.workdir, args.steps, args.tracking_uri, args.step_sleep)


if __name__ == "__main__":
    main()
