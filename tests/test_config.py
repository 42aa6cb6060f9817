"""params.yaml: the repository's file is valid, and bad keys or values fail naming them."""

from __future__ import annotations

import pytest

from pipeline_lib.config import (
    ConfigError,
    PipelineConfig,
    apply_overrides,
    load_config,
    parse_config,
)
from tests.conftest import REPO_ROOT


def test_repository_params_file_is_valid_and_matches_defaults():
    config = load_config(REPO_ROOT / "params.yaml")
    assert config.train.strategies == ("knapsack", "uniform")
    assert config == parse_config({})  # the file spells out the defaults


@pytest.mark.parametrize(
    ("raw", "backend"),
    [
        ({}, "hf"),  # the embedded tiny model
        ({"train": {"backend": "auto"}}, "hf"),
        ({"bootstrap": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}}, "vllm"),
        ({"bootstrap": {"model": "models/my-checkpoint"}, "train": {"backend": "auto"}}, "vllm"),
        ({"train": {"backend": "vllm"}}, "vllm"),  # an explicit engine is kept
        ({"bootstrap": {"model": "org/model"}, "train": {"backend": "hf"}}, "hf"),
    ],
)
def test_auto_backend_is_resolved_when_params_load(raw, backend):
    assert parse_config(raw).train.backend == backend


def test_unknown_key_names_it_and_the_allowed_keys():
    with pytest.raises(ConfigError) as error:
        parse_config({"train": {"stepz": 3}})
    message = str(error.value)
    assert "unknown key 'train.stepz'" in message and "steps" in message


def test_bad_value_names_key_and_allowed_values():
    with pytest.raises(
        ConfigError,
        match=r"train.strategies.0.*'knapsack', 'uniform', 'uniform-0.5x', 'uniform-2x'",
    ):
        parse_config({"train": {"strategies": ["greedy"]}})


def test_rollout_bounds_are_checked_together():
    with pytest.raises(ConfigError, match="min_rollouts <= rollouts_per_prompt <= max_rollouts"):
        parse_config({"train": {"min_rollouts": 4, "rollouts_per_prompt": 2}})


def test_gradient_value_needs_the_exact_rules():
    with pytest.raises(ConfigError, match="rollout_value 'gradient' needs allocation_rules"):
        parse_config({"train": {"rollout_value": "gradient", "allocation_rules": "official"}})


def test_pass_at_k_cannot_exceed_samples():
    with pytest.raises(ConfigError, match=r"pass_at \[8\] exceeds samples_per_prompt 4"):
        parse_config({"evaluate": {"pass_at": [1, 8]}})


def test_overrides_apply_dotted_keys_and_are_validated(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  steps: 5\n")
    assert load_config(params, {"train.steps": 7}).train.steps == 7
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(params, {"train.nope": 1})
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}


def test_fingerprint_changes_with_any_value():
    assert parse_config({}).fingerprint() != parse_config({"seed": 1}).fingerprint()


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_params_field_is_documented_and_listed_by_help():
    """cleanrl-style: a description under every field, shown by `python -m flows.<stage> --help`."""
    import subprocess
    import sys

    from pipeline_lib.config import describe_section

    lines = describe_section(PipelineConfig)
    undocumented = [line for line in lines if line.strip().endswith("None")]
    assert not undocumented, undocumented
    help_text = subprocess.run(
        [sys.executable, "-m", "flows.train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert 'train.allocation_rules (one of exact|official; default "exact")' in help_text
    # Every registered strategy is named as an allowed value of train.strategies.
    from pipeline_lib.allocation.strategies import STRATEGIES

    allowed = help_text.split("train.strategies (list of ", 1)[1].split(";", 1)[0].split("|")
    assert set(allowed) == set(STRATEGIES)
    assert "train.ppo_mini_batches" in help_text and "bootstrap.sft" not in help_text
