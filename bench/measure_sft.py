"""Measure the supervised warm-up of the tiny policy: held-out accuracy per level.

    python -m bench.measure_sft [--steps 660] [--seed 0] [--save DIR]

Prints greedy and sampled (temperature 1) held-out accuracy by level, overall,
and wall time. A benchmark script, not a test: it takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from pipeline_lib.config import SFTParams, TinyModelParams
from pipeline_lib.data.synthetic import generate_arithmetic
from pipeline_lib.policy.checkpoint import save_policy
from pipeline_lib.policy.sft import run_sft
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.prompts import PromptSet, encode_prompts
from pipeline_lib.rewards.sampling import sample_rewards
from pipeline_lib.rollout.base import SamplingConfig
from pipeline_lib.rollout.hf_engine import HFGenerateEngine

DEFAULTS = SFTParams()


def accuracy(engine, prompts: PromptSet, samples: int, temperature: float, seed: int):
    """Per-prompt accuracy float[M] (greedy when temperature is 0)."""
    sampling = SamplingConfig(max_new_tokens=8, temperature=temperature, seed=seed)
    return sample_rewards(engine, prompts, sampling, samples, "last_number").mean(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps)
    parser.add_argument("--lr", type=float, default=DEFAULTS.learning_rate)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--weights", type=str, default=None, help="level weights, e.g. 4,4,2,2,1,1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-pool", type=int, default=20000)
    parser.add_argument("--heldout", type=int, default=600)
    parser.add_argument(
        "--samples", type=int, default=4, help="samples per prompt at temperature 1"
    )
    parser.add_argument(
        "--curve-every", type=int, default=0, help="print greedy accuracy by level every N steps"
    )
    parser.add_argument("--save", type=str, default=None, help="save the trained policy here")
    args = parser.parse_args()

    config = SFTParams(learning_rate=args.lr, batch_size=args.batch_size, steps=args.steps)
    if args.weights:
        weights = [float(w) for w in args.weights.split(",")]
        config = config.model_copy(update={"level_weights": dict(enumerate(weights, start=1))})
    torch.set_num_threads(args.threads)

    train = generate_arithmetic(args.train_pool, args.seed, split="train")
    heldout = generate_arithmetic(args.heldout, args.seed, split="heldout")
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TinyModelParams(), seed=args.seed)
    print(f"parameters: {model.num_parameters():,}  config: {config}")
    print("train pool by level:", train["level"].value_counts().sort_index().to_dict())

    engine = HFGenerateEngine(model, tokenizer)  # shares the model: sees every SFT step
    heldout_prompts = PromptSet(
        list(heldout["id"]), encode_prompts(tokenizer, heldout["problem"]), list(heldout["answer"])
    )

    def print_curve(step: int, loss: float) -> None:
        if args.curve_every and step % args.curve_every == 0:
            correct = accuracy(engine, heldout_prompts, 1, 0.0, args.seed)
            by_level = pd.Series(correct).groupby(heldout["level"].to_numpy()).mean()
            levels = " ".join(f"{value:.2f}" for value in by_level)
            print(
                f"step {step:4d} loss {loss:.4f} greedy by level {levels} mean {correct.mean():.3f}"
            )

    metrics = run_sft(
        model,
        tokenizer,
        list(train["problem"]),
        list(train["answer"]),
        list(train["level"]),
        config,
        seed=args.seed,
        num_threads=args.threads,
        progress=not args.curve_every,
        on_step=print_curve,
    )
    started = time.perf_counter()
    greedy = accuracy(engine, heldout_prompts, 1, 0.0, args.seed)
    sampled = accuracy(engine, heldout_prompts, args.samples, 1.0, args.seed)
    eval_s = time.perf_counter() - started

    table = pd.DataFrame({"level": heldout["level"], "greedy": greedy, "sampled_t1": sampled})
    by_level = table.groupby("level").agg(
        prompts=("greedy", "size"), greedy=("greedy", "mean"), sampled_t1=("sampled_t1", "mean")
    )
    print(by_level.round(3).to_string())
    print(
        f"overall greedy {greedy.mean():.3f}  sampled_t1 {sampled.mean():.3f}  "
        f"share of prompts with 0<p<1 at t=1: {np.mean((sampled > 0) & (sampled < 1)):.3f}"
    )
    print(
        f"final loss {metrics['sft/loss']:.4f}  sft wall {metrics['sft/wall_s']:.1f} s  "
        f"eval {eval_s:.1f} s"
    )
    if args.save:
        save_policy(model, tokenizer, args.save)
        print("saved to", args.save)


if __name__ == "__main__":
    main()
