"""Presets: every shipped one validates like params.yaml and passes `check-preset`; a bad
one is refused naming the problem; its `dvc exp run` arguments carry it unchanged."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import yaml

from flows.common import parse_overrides
from pipeline_lib.config import ConfigError
from pipeline_lib.presets import (
    check_problems,
    load_preset,
    preset_config,
    preset_names,
)
from tests.conftest import REPO_ROOT

PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def test_the_three_presets_ship():
    assert {"paper-qwen2.5-math-7b", "qwen2.5-math-1.5b-1gpu", "smollm2-cpu-smoke"} <= set(
        preset_names()
    )


@pytest.mark.parametrize("name", preset_names())
def test_check_preset_passes_and_prints_the_resolved_config(name):
    result = subprocess.run(
        [sys.executable, "-m", "ops.preset", "check", name],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(f"preset {name}: ok")
    resolved = yaml.safe_load(result.stdout.split("\n# rollouts per step")[0])
    assert resolved == preset_config(PARAMS, name).model_dump(mode="json")


def test_the_paper_preset_is_the_official_script(tmp_path):
    """The values of run_knapsack_grpo_7b.sh that our knobs express."""
    config = preset_config(PARAMS, "paper-qwen2.5-math-7b")
    train, evaluate = config.train, config.evaluate
    assert config.bootstrap.model == "Qwen/Qwen2.5-Math-7B"
    assert config.prepare.source == "hf:BytedTsinghua-SIA/DAPO-Math-17k"
    assert (train.prompts_per_step, train.rollouts_per_prompt) == (256, 8)
    assert (train.min_rollouts, train.max_rollouts, train.ppo_mini_batches) == (2, 128, 8)
    assert (train.learning_rate, train.clip_low, train.clip_high) == (1e-6, 0.2, 0.28)
    assert (train.advantage_clip, train.kl_coef, train.steps) == (5.0, 0.0, 1000)
    assert (train.allocation_rules, train.buffer_length, train.max_new_tokens) == (
        "official",
        8,
        4096,
    )
    assert (evaluate.samples_per_prompt, evaluate.temperature) == (16, 0.6)


def test_a_bad_key_or_value_in_a_preset_fails_naming_it(tmp_path):
    (tmp_path / "typo.yaml").write_text("train.stepz: 3\n")
    with pytest.raises(ConfigError, match=r"(?s)preset 'typo'.*unknown key 'train.stepz'"):
        preset_config(PARAMS, "typo", tmp_path)
    (tmp_path / "flat.yaml").write_text("- train.steps\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_preset("flat", tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*known: flat, typo"):
        load_preset("nope", tmp_path)


def test_check_problems_name_malformed_ids_missing_files_and_impossible_budgets(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump(
            {
                "bootstrap.model": "not a model id",
                "prepare.source": "hf:no-slash",
                "prepare.limit": 8,
                "prepare.benchmarks": [{"name": "x", "source": "missing/test.jsonl"}],
                "train.prompts_per_step": 16,
            }
        )
    )
    problems = check_problems(preset_config(PARAMS, "bad", tmp_path), REPO_ROOT)
    text = "\n".join(problems)
    assert "bootstrap.model: 'not a model id'" in text
    assert "prepare.source: 'hf:no-slash' is not hf:<owner>/<name>" in text
    assert "prepare.benchmarks[x]: 'missing/test.jsonl' is no file" in text
    assert "train.prompts_per_step 16 exceeds prepare.limit 8" in text


@pytest.mark.parametrize("name", preset_names())
def test_the_dvc_exp_run_arguments_carry_the_preset_unchanged(name):
    result = subprocess.run(
        [sys.executable, "-m", "ops.preset", "dvc-args", name],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    words = shlex.split(result.stdout)
    assert words[::2] == ["-S"] * (len(words) // 2)
    assert parse_overrides(words[1::2]) == load_preset(name)
