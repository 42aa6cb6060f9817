"""Prefect tasks of stage `bootstrap`: build and warm up the tiny policy, or load a real one."""

from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.config import BootstrapConfig
from pipeline_lib.data.synthetic import generate_arithmetic
from pipeline_lib.policy.checkpoint import load_policy, save_policy
from pipeline_lib.policy.sft import run_sft
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.tracking import Tracker


@task(cache_policy=NO_CACHE)
def build_tiny_policy(
    config: BootstrapConfig, levels: tuple[int, ...], seed: int, threads: int, tracker: Tracker
) -> str:
    """Embedded default: character tokenizer + tiny Qwen2, SFT on the synthetic train side.

    SFT draws its own, larger pool from the train side of the hash split (so it never
    sees a benchmark problem): SFT on the 2,048-prompt RL pool alone memorises it.
    """
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, config.tiny, seed=seed)
    train = generate_arithmetic(config.sft.prompts, seed, list(levels), split="train")
    metrics = run_sft(
        model,
        tokenizer,
        train["problem"].tolist(),
        train["answer"].tolist(),
        train["level"].tolist(),
        config.sft,
        seed=seed,
        num_threads=threads,
    )
    tracker.log_metrics(metrics)
    return str(save_policy(model, tokenizer, config.output_dir))


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])  # hub downloads
def import_pretrained_policy(config: BootstrapConfig) -> str:
    """Real use: a Hugging Face id, a local checkpoint or a GGUF file, saved as safetensors."""
    model, tokenizer = load_policy(config.model, gguf_file=config.gguf_file)
    return str(save_policy(model, tokenizer, config.output_dir))
