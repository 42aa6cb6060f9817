"""Presets: named sets of params overrides (`presets/<name>.yaml`, dotted keys), validated
exactly like params.yaml, plus the checks a preset needs before it meets a GPU.

A preset is what `-S key=value` pairs are, written down once: `make run PRESET=<name>`
runs `dvc exp run` with them, the `pipeline` flow takes `preset=<name>`, and
`make check-preset PRESET=<name>` validates one without compute or network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline_lib.config import ConfigError, PipelineConfig, apply_overrides, parse_config

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
# A Hugging Face id: owner/name, letters, digits, '-', '_', '.' (no spaces, no '..').
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
S3_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+$")


def preset_names(directory: Path = PRESETS_DIR) -> list[str]:
    return sorted(path.stem for path in directory.glob("*.yaml"))


def load_preset(name: str, directory: Path = PRESETS_DIR) -> dict[str, Any]:
    """The preset's dotted overrides; ConfigError naming the known presets otherwise."""
    path = directory / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(preset_names(directory)) or "none"
        raise ConfigError(f"unknown preset {name!r} (no {path}); known: {known}")
    overrides = yaml.safe_load(path.read_text()) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path} must hold a mapping of dotted keys to values")
    return overrides


def preset_config(
    params: Mapping[str, Any], name: str, directory: Path = PRESETS_DIR
) -> PipelineConfig:
    """params.yaml's mapping with the preset applied, validated (a bad key fails here)."""
    try:
        return parse_config(apply_overrides(params, load_preset(name, directory)))
    except ConfigError as error:
        raise ConfigError(f"preset {name!r}: {error}") from None


def source_problem(source: str, root: Path, what: str) -> str | None:
    """Why a data source is not a well-formed id, URL or existing path (None if it is)."""
    if source == "synthetic" and what == "prepare.source":
        return None
    if source.startswith("hf:"):
        return None if HUB_ID.match(source[3:]) else f"{what}: {source!r} is not hf:<owner>/<name>"
    if source.startswith("s3://"):
        return None if S3_URL.match(source) else f"{what}: {source!r} is not s3://<bucket>/<key>"
    path = root / source
    if not path.is_file():
        return f"{what}: {source!r} is no file under {root} (nor hf:<id> nor s3://)"
    if path.suffix not in (".jsonl", ".parquet"):
        return f"{what}: {source!r} is neither .jsonl nor .parquet"
    return None


def model_problem(config: PipelineConfig, root: Path) -> str | None:
    """Why bootstrap.model is neither `tiny`, a Hub id nor an existing checkpoint."""
    model = config.bootstrap.model
    if model == "tiny":
        return None
    local = root / model
    if local.is_dir():
        gguf = config.bootstrap.gguf_file
        if gguf is not None and not (local / gguf).is_file():
            return f"bootstrap.gguf_file: {gguf!r} is not in {model}"
        return None
    if HUB_ID.match(model):
        return None
    return f"bootstrap.model: {model!r} is neither 'tiny', a Hub id nor a directory under {root}"


def budget_lines(config: PipelineConfig) -> list[str]:
    """The step's budget arithmetic, as check-preset prints it."""
    train = config.train
    rollouts = train.prompts_per_step * train.rollouts_per_prompt
    rows = rollouts // train.ppo_mini_batches
    return [
        f"rollouts per step: {train.prompts_per_step} prompts x N_avg "
        f"{train.rollouts_per_prompt} = {rollouts} (N_low {train.min_rollouts}, "
        f"N_up {train.max_rollouts})",
        f"optimizer steps per rollout batch: {train.ppo_mini_batches} x {train.ppo_epochs} "
        f"epochs, about {rows} rows each at the uniform budget",
        f"training rollouts in all: {train.steps} steps x {rollouts} = {train.steps * rollouts:,}",
    ]


def check_problems(config: PipelineConfig, root: Path) -> list[str]:
    """Everything a preset can get wrong that the schema does not see."""
    problems = [
        model_problem(config, root),
        source_problem(config.prepare.source, root, "prepare.source"),
    ]
    problems += [
        source_problem(b.source, root, f"prepare.benchmarks[{b.name}]")
        for b in config.prepare.benchmarks
    ]
    train = config.train
    if train.ppo_mini_batches > train.prompts_per_step * train.rollouts_per_prompt:
        problems.append(
            f"train.ppo_mini_batches {train.ppo_mini_batches} exceeds the "
            f"{train.prompts_per_step * train.rollouts_per_prompt} rollouts of a step"
        )
    limit = config.prepare.limit
    if limit is not None and train.prompts_per_step > limit:
        problems.append(
            f"train.prompts_per_step {train.prompts_per_step} exceeds prepare.limit {limit}"
        )
    return [problem for problem in problems if problem]
