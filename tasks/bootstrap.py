"""Prefect tasks of stage `bootstrap`: build and warm up the tiny policy, or load a real one."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.config import BootstrapConfig, SFTParams
from pipeline_lib.data.synthetic import generate_arithmetic
from pipeline_lib.policy.checkpoint import load_policy, save_policy
from pipeline_lib.policy.sft import run_sft
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.prompts import PromptSet, encode_prompts
from pipeline_lib.rewards.sampling import sample_rewards
from pipeline_lib.rollout.base import SamplingConfig
from pipeline_lib.rollout.hf_engine import HFGenerateEngine
from pipeline_lib.tracking import Tracker

# The validation problems come from the train side with another seed than the SFT pool.
VALIDATION_SEED_OFFSET = 10_000
# Answers of the synthetic levels have at most 6 characters (+ EOS): 8 as in train.
VALIDATION_MAX_NEW_TOKENS = 8


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
        validate=validation_check(model, tokenizer, config.sft, levels, seed, tracker),
    )
    tracker.log_metrics(metrics)
    if config.sft.target_accuracy is not None and not metrics["sft/target_reached"]:
        print(
            f"warning: SFT stopped after {int(metrics['sft/steps'])} steps at validation "
            f"accuracy {metrics['sft/stop_accuracy']:.3f}, below the target "
            f"{config.sft.target_accuracy}: raise bootstrap.sft.steps or the learning rate"
        )
    return str(save_policy(model, tokenizer, config.output_dir))


def validation_check(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    config: SFTParams,
    levels: tuple[int, ...],
    seed: int,
    tracker: Tracker,
) -> Callable[[int], float]:
    """The SFT stop check: sampled accuracy on train-side problems the SFT pool was not
    drawn with (another seed), one sample each at temperature 1 with a fixed sampling
    seed, graded like GRPO's rewards; each result logged as `sft/validation_accuracy`."""
    table = generate_arithmetic(
        config.validation_prompts, seed + VALIDATION_SEED_OFFSET, list(levels), split="train"
    )
    prompts = PromptSet(
        table["id"].tolist(), encode_prompts(tokenizer, table["problem"]), table["answer"].tolist()
    )
    engine = HFGenerateEngine(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=VALIDATION_MAX_NEW_TOKENS, temperature=1.0, seed=seed)

    def validate(step: int) -> float:
        accuracy = float(sample_rewards(engine, prompts, sampling, 1, "last_number").mean())
        tracker.log_metrics({"sft/validation_accuracy": accuracy}, step=step)
        return accuracy

    return validate


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])  # hub downloads
def import_pretrained_policy(config: BootstrapConfig) -> str:
    """Real use: a Hugging Face id, a local checkpoint or a GGUF file, saved as safetensors."""
    model, tokenizer = load_policy(config.model, gguf_file=config.gguf_file)
    return str(save_policy(model, tokenizer, config.output_dir))
