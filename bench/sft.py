"""CPU seconds and wall seconds per SFT step of the embedded default, by thread count and
OpenMP wait policy.

    .venv/bin/python -m bench.sft [--steps 40] [--threads 2] [--wait active|passive]
        [--spin N] [--hogs K]

Builds the tiny policy and the SFT pool as the bootstrap stage does (params.yaml, seed 0)
and runs `run_sft` without the stop check. CPU time (`time.process_time`, all threads)
is the number to compare on a busy machine: spinning OpenMP threads burn it while wall
time depends on what else runs. `--spin N` sets GOMP_SPINCOUNT (how long a waiting
thread spins before it sleeps; unset: the project's default); `--hogs K` runs K
busy-looping processes beside it for the contention case. Prints the medians over
steps 5..N (the first steps pay for allocation) and the load average.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait", choices=["active", "passive"], default="passive")
    parser.add_argument("--spin", type=int, default=None, help="GOMP_SPINCOUNT")
    parser.add_argument("--hogs", type=int, default=0, help="busy processes beside it")
    args = parser.parse_args()
    # Before torch (and pipeline_lib, which sets the defaults) load OpenMP.
    os.environ["OMP_WAIT_POLICY"] = args.wait.upper()
    if args.spin is not None:
        os.environ["GOMP_SPINCOUNT"] = str(args.spin)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    try:
        run(args)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def run(args: argparse.Namespace) -> None:
    import time

    import numpy as np

    from pipeline_lib.config import load_config
    from pipeline_lib.data.synthetic import generate_arithmetic
    from pipeline_lib.policy.sft import run_sft
    from pipeline_lib.policy.tiny import build_tiny_qwen2
    from pipeline_lib.policy.tokenizer import build_char_tokenizer

    config = load_config("params.yaml", {"bootstrap.sft.target_accuracy": None})
    sft = config.bootstrap.sft.model_copy(update={"steps": args.steps})
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, config.bootstrap.tiny, seed=0)
    pool = generate_arithmetic(sft.prompts, 0, list(config.prepare.synthetic.levels), split="train")
    cpu, wall = [], []
    clock = [time.process_time(), time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        cpu.append(time.process_time() - clock[0])
        wall.append(time.perf_counter() - clock[1])
        clock[:] = [time.process_time(), time.perf_counter()]

    run_sft(
        model,
        tokenizer,
        pool["problem"].tolist(),
        pool["answer"].tolist(),
        pool["level"].tolist(),
        sft,
        seed=0,
        num_threads=args.threads,
        progress=False,
        on_step=on_step,
    )
    print(
        f"threads {args.threads}, wait {args.wait}, GOMP_SPINCOUNT "
        f"{os.environ.get('GOMP_SPINCOUNT', '(unset)')}, {args.hogs} hogs: "
        f"median per step over steps 5-{args.steps}: "
        f"{np.median(cpu[4:]):.2f} CPU-s, {np.median(wall[4:]):.2f} s wall; "
        f"load average {os.getloadavg()[0]:.1f}",
        file=sys.stdout,
    )


if __name__ == "__main__":
    main()
