"""GPU check of the GRPO update paths (run on a CUDA machine; CI has none).

    python scripts/check_gpu_update.py [--out DIR]

Builds a tiny Qwen2 policy and one random GRPO batch, then compares the weights
after two updates on: the CPU (reference), one CUDA device in this process
(`LocalUpdater`), and a one-process `AccelerateUpdateGroup` on CUDA, which
accelerate runs as FSDP2. Also checks the group's gathered AdamW state resumes
exactly, and that the HF rollout engine samples on CUDA. Prints one JSON
report (also written to DIR/gpu_update_check.json) and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

from pipeline_lib.config import TinyModelParams
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.rollout.base import Completion, SamplingConfig
from pipeline_lib.rollout.hf_engine import HFGenerateEngine
from pipeline_lib.update import LocalUpdater, UpdateSettings, build_update_batch
from pipeline_lib.update.distributed import AccelerateUpdateGroup

SETTINGS = UpdateSettings(micro_batch_rows=16)
LEARNING_RATE = 1e-3


def random_batch(model, tokenizer, rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, model.config.vocab_size, (length,), generator=generator).tolist()

    completions = []
    for index in range(rows):
        prompt, response = tokens(4, 16), tokens(1, 12)
        completions.append(
            Completion(index, prompt, response, [-1.0] * len(response), "", finished=True)
        )
    advantages = torch.randn(rows, generator=generator)
    advantages[::5] = 0  # some rows without signal
    return build_update_batch(completions, advantages, tokenizer.pad_token_id)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        (x.detach().cpu() - y.detach().cpu()).abs().max().item()
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    # Full float32 matrix products on both devices, so the comparison measures our code.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tokenizer = build_char_tokenizer()
    config = TinyModelParams(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
    model = build_tiny_qwen2(tokenizer, config)
    batches = [random_batch(model, tokenizer, rows=96, seed=seed) for seed in (1, 2)]
    report: dict[str, object] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "parameters": sum(p.numel() for p in model.parameters()),
    }

    def local_run(device: str) -> tuple[torch.nn.Module, list[float]]:
        copy_ = copy.deepcopy(model).to(device)
        updater = LocalUpdater(copy_, learning_rate=LEARNING_RATE, settings=SETTINGS)
        seconds = []
        for batch in batches:
            stats = updater.update(batch)
            seconds.append(stats["train/update_seconds"])
        return copy_, seconds

    cpu_model, report["cpu_update_seconds"] = local_run("cpu")
    cuda_model, report["cuda_update_seconds"] = local_run("cuda")
    report["cuda_vs_cpu_max_abs_diff"] = max_difference(cuda_model, cpu_model)

    fsdp_model = copy.deepcopy(model)
    started = time.perf_counter()
    with contextlib.closing(
        AccelerateUpdateGroup(
            fsdp_model, num_processes=1, learning_rate=LEARNING_RATE, settings=SETTINGS
        )
    ) as group:
        report["group_startup_seconds"] = time.perf_counter() - started
        report["group_parallelism"] = group.parallelism
        first = group.update(batches[0])
        checkpoint_model = copy.deepcopy(fsdp_model)
        optimizer_state = group.optimizer_state_dict()
        second = group.update(batches[1])
        report["group_update_seconds"] = [
            first["train/update_seconds"],
            second["train/update_seconds"],
        ]
    report["fsdp_vs_cpu_max_abs_diff"] = max_difference(fsdp_model, cpu_model)
    with contextlib.closing(
        AccelerateUpdateGroup(
            checkpoint_model, num_processes=1, learning_rate=LEARNING_RATE, settings=SETTINGS
        )
    ) as group:
        group.load_optimizer_state_dict(optimizer_state)
        group.update(batches[1])
    report["fsdp_resume_max_abs_diff"] = max_difference(checkpoint_model, fsdp_model)

    engine = HFGenerateEngine(cuda_model, tokenizer)
    prompts = [tokenizer("12+7=", add_special_tokens=False)["input_ids"]] * 4
    groups = engine.generate(prompts, [3] * 4, SamplingConfig(max_new_tokens=6, seed=0))
    report["hf_cuda_completions"] = sum(len(group) for group in groups)
    report["hf_cuda_tokens_per_second"] = engine.last_stats.tokens_per_second

    checks = {
        "group runs FSDP": report["group_parallelism"] == "FSDP",
        "cuda matches cpu": report["cuda_vs_cpu_max_abs_diff"] < 1e-4,
        "fsdp matches cpu": report["fsdp_vs_cpu_max_abs_diff"] < 1e-4,
        "fsdp resume exact": report["fsdp_resume_max_abs_diff"] < 1e-6,
        "hf engine samples on cuda": report["hf_cuda_completions"] == 12,
    }
    report["checks"] = checks
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_update_check.json").write_text(text)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
