"""The training loop on a real tiny model with the HF engine: metrics, checkpoints, resume."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from pipeline_lib.config import TinyModelParams, TrainConfig
from pipeline_lib.data.synthetic import split_arithmetic
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.prompts import PromptSet, encode_prompts
from pipeline_lib.rollout.hf_engine import HFGenerateEngine
from pipeline_lib.tracking import NullTracker
from pipeline_lib.training import (
    DirectoryCheckpointer,
    TrainingRun,
    TrainState,
    step_prompts,
    train_policy,
)
from pipeline_lib.training.compute import evaluation_curve
from tasks.train import open_updater


class CrashingEngine:
    """A real engine that raises on its n-th generate call (a crash injected mid-run)."""

    def __init__(self, engine, crash_on_call: int | None = None):
        self.engine, self.crash_on_call, self.calls = engine, crash_on_call, 0

    @property
    def last_stats(self):
        return self.engine.last_stats

    def generate(self, prompts, n, sampling):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("injected crash")
        return self.engine.generate(prompts, n, sampling)

    def update_weights(self, state_dict):
        self.engine.update_weights(state_dict)

    def close(self):
        self.engine.close()


@pytest.fixture()
def setup():
    tokenizer = build_char_tokenizer()
    train, heldout = split_arithmetic(32, 8, seed=0)

    def prompt_set(table):
        return PromptSet(
            table["id"].tolist(),
            encode_prompts(tokenizer, table["problem"]),
            table["answer"].tolist(),
        )

    def fresh_model():
        return build_tiny_qwen2(
            tokenizer,
            TinyModelParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
            seed=0,
        )

    config = TrainConfig(
        steps=3,
        prompts_per_step=8,
        rollouts_per_prompt=4,
        max_rollouts=16,
        eval_every=2,
        eval_prompts=8,
        max_new_tokens=4,
    )
    return tokenizer, prompt_set(train), prompt_set(heldout), fresh_model, config


def run(setup, tmp_path, engine_wrapper=lambda e: e, strategy="knapsack", tracker=None, **params):
    """The train task's wiring: restore, open the updater on the restored model, train.

    `params` override the fixture's TrainConfig fields (validated, like params.yaml)."""
    tokenizer, train_set, heldout_set, fresh_model, config = setup
    config = TrainConfig.model_validate(config.model_dump() | params)
    model = fresh_model()
    engine = engine_wrapper(HFGenerateEngine(fresh_model(), tokenizer))
    engine.update_weights(model.state_dict())
    checkpointer = DirectoryCheckpointer(tmp_path, fingerprint="test")
    state = checkpointer.restore(model) or TrainState()
    training = TrainingRun(model, tokenizer, train_set, heldout_set, config, strategy, seed=0)
    with contextlib.closing(open_updater(model, config)) as updater:
        result = train_policy(
            training, state, engine, updater, tracker or NullTracker(), checkpointer, progress=False
        )
    return result, model, engine


class CallRecorder(NullTracker):
    """Records the order of metric logs (by step) and figure logs (by artifact name)."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", step))

    def log_figure(self, figure, artifact_file):
        self.calls.append(("figure", artifact_file))


def test_epoch_plots_are_drawn_after_the_step_that_closes_the_epoch_is_timed(setup, tmp_path):
    """32 prompts, 8 a step: step 5 opens epoch 1, so epoch 0's plot follows step 5's
    metrics (its `time/step_seconds` is already taken), and the run's end logs epoch 1's
    (with its calibration: epoch 0 had no prediction to calibrate)."""
    recorder = CallRecorder()
    run(setup, tmp_path, tracker=recorder, steps=6)
    calls = recorder.calls
    epoch_0 = calls.index(("figure", "plots/allocation/epoch_000.png"))
    assert calls[epoch_0 - 1] == ("metrics", 5)
    assert calls[epoch_0 + 1 :] == [
        ("metrics", 6),
        ("figure", "plots/allocation/epoch_001.png"),
        ("figure", "plots/calibration/epoch_001.png"),
    ]


def saved_step(state_dir):
    return DirectoryCheckpointer(state_dir, fingerprint="test").saved_step()


def test_loop_records_every_step_and_checkpoint(setup, tmp_path):
    result, _, _ = run(setup, tmp_path)
    steps = result.steps
    assert steps["step"].tolist() == [0, 1, 2, 3]
    trained = steps[steps.step > 0]
    assert (trained["alloc/mean_rollouts"] == 4).all()  # budget = 8 prompts x 4
    assert trained["rollout/effective_gradient_ratio"].between(0, 1).all()
    assert {"train/loss", "train/grad_norm", "sync/seconds", "eval/accuracy"} <= set(steps.columns)
    assert saved_step(tmp_path) == 3


# 2 update processes: a worker group (accelerate DDP here, FSDP on GPUs) whose
# gathered AdamW state goes into the checkpoint.
@pytest.mark.parametrize("update_processes", [1, 2])
def test_crash_resumes_from_last_completed_step_without_repeating_rollouts(
    setup, tmp_path, update_processes
):
    # generate calls: 1 = step-0 evaluation, 2 = step 1, 3 = step 2, 4 = eval at step 2, 5 = step 3.
    with pytest.raises(RuntimeError, match="injected crash"):
        run(
            setup,
            tmp_path,
            lambda e: CrashingEngine(e, crash_on_call=5),
            update_processes=update_processes,
        )
    assert saved_step(tmp_path) == 2  # steps 1 and 2 done

    result, model, engine = run(
        setup, tmp_path, lambda e: CrashingEngine(e), update_processes=update_processes
    )
    assert result.resumed_from_step == 2
    assert engine.calls == 2  # step 3 and the final evaluation: nothing repeated
    assert result.steps["step"].tolist() == [0, 1, 2, 3]

    uninterrupted, straight_model, _ = run(
        setup, tmp_path / "straight", update_processes=update_processes
    )
    for (name, a), (_, b) in zip(
        model.state_dict().items(), straight_model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resume")


def test_step_prompts_visit_each_prompt_once_per_epoch():
    seen = np.concatenate([step_prompts(32, s, 8, seed=3)[1] for s in range(4)])
    assert sorted(seen.tolist()) == list(range(32))
    assert step_prompts(32, 4, 8, seed=3)[0] == 1


def test_uniform_strategy_allocates_evenly(setup, tmp_path):
    result, _, _ = run(setup, tmp_path, strategy="uniform")
    assert (result.steps.loc[result.steps.step > 0, "alloc/max_rollouts"] == 4).all()


@pytest.mark.parametrize("strategy", ["uniform-2x", "dynamic-sampling"])
def test_compute_totals_add_up_over_the_run(setup, tmp_path, strategy):
    """Every step's spent compute is logged and the totals are running sums; uniform-2x
    spends 2 x 8 prompts x 4 rollouts a step, dynamic sampling at least one round's 32."""
    result, _, _ = run(setup, tmp_path, strategy=strategy)
    trained = result.steps[result.steps.step > 0]
    for key in ("rollouts", "completion_tokens", "update_rows", "rollout_seconds"):
        running = trained[f"compute/{key}"].cumsum().to_numpy()
        np.testing.assert_allclose(trained[f"compute/{key}_total"], running)
    assert (
        trained["compute/rollouts"] == trained["alloc/mean_rollouts"] * trained["rollout/prompts"]
    ).all()
    if strategy == "uniform-2x":
        assert (trained["compute/rollouts"] == 64).all()
    else:
        assert (trained["compute/rollouts"] >= 32).all()
        assert (trained["update/groups"] <= 8).all()
    assert result.compute_totals["compute/rollouts_total"] == trained["compute/rollouts"].sum()
    assert result.final_prompt_scores.shape == (8,)  # eval_prompts
    assert result.final_prompt_scores.mean() == pytest.approx(result.final_accuracy)
    curve = evaluation_curve(result.steps)
    assert curve["step"].tolist() == [0, 2, 3]
    assert curve["rollouts"].iloc[0] == 0 and curve["rollouts"].is_monotonic_increasing


def test_update_diagnostics_average_over_rows_with_signal():
    from pipeline_lib.rollout.base import Completion
    from pipeline_lib.update import UpdateSettings, build_update_batch, grpo_update

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(
        tokenizer,
        TinyModelParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        seed=0,
    )
    prompt = encode_prompts(tokenizer, ["  1+  2="])[0]
    completions = [
        Completion(
            0, prompt, tokenizer.encode(t, add_special_tokens=False), [-1.0] * len(t), t, False
        )
        for t in ["3", "4", "5", "6"]
    ]
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.0])  # half the rows carry no signal
    batch = build_update_batch(completions, advantages, tokenizer.pad_token_id)
    stats = grpo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, UpdateSettings())
    assert stats["train/rows_with_signal"] == 2


def test_token_budget_spends_expected_completion_tokens(setup, tmp_path):
    """budget_unit: tokens runs end to end; the status table learns each prompt's length,
    and a step's allocation costs about prompts x N_avg x mean expected length."""
    result, _, _ = run(setup, tmp_path, budget_unit="tokens", steps=4)
    steps = result.steps
    assert steps["step"].tolist() == [0, 1, 2, 3, 4]
    status = DirectoryCheckpointer(tmp_path, fingerprint="test").restore(setup[3]()).status
    visited = status[status.total_rollouts > 0]
    assert (visited.total_tokens > 0).all()
    # max_new_tokens = 4 bounds every completion, so no prompt averages more than 4 tokens.
    assert (visited.total_tokens <= 4 * visited.total_rollouts).all()
    assert steps["alloc/mean_rollouts"].iloc[1:].min() > 0


def test_greso_logs_its_skips_and_carries_its_exploration_probabilities_step_to_step(
    setup, tmp_path
):
    """32 prompts, 8 a step: step 1 has no visit to skip on; later steps' refill rounds draw
    prompts visited before, which the untrained model mostly failed. Epoch 1 (steps 5-6)
    is the first whose steps move GRESO's probabilities (by 0.01 each)."""
    result, _, _ = run(setup, tmp_path, strategy="greso", steps=6)
    trained = result.steps[result.steps.step > 0].set_index("step")
    first_epoch, second_epoch = trained.loc[1:4], trained.loc[5:6]
    assert trained.loc[1, "rollout/skipped_prompts"] == 0
    assert trained["rollout/skipped_prompts"].sum() > 0
    assert (first_epoch[["strategy/p_easy", "strategy/p_hard"]] == 0.5).all().all()
    for key in ("strategy/p_easy", "strategy/p_hard"):
        steps = np.diff(np.r_[0.5, second_epoch[key].to_numpy()])
        np.testing.assert_allclose(np.abs(steps), 0.01)
    rolled = trained["alloc/mean_rollouts"] * trained["rollout/prompts"]
    assert (trained["compute/rollouts"] == rolled).all()  # skipped prompts cost nothing


def test_reinforce_ada_trains_on_n_avg_rows_per_prompt_and_pays_for_every_round(setup, tmp_path):
    result, _, _ = run(setup, tmp_path, strategy="reinforce-ada")
    trained = result.steps[result.steps.step > 0]
    # 8 prompts x N_avg 4 rows to the update; 1 to 4 rounds of 4 rollouts per prompt.
    assert (trained["compute/update_rows"] == 32).all()
    assert trained["compute/rollouts"].between(32, 128).all()
    assert (trained["compute/rollouts"] > 32).any()  # the untrained model rarely balances
