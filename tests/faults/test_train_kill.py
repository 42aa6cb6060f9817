"""kill -9 of a small training run: the resumed run equals an uninterrupted one.

train-kill: at 10 random moments (a rollout call or a checkpoint write); no completed
(checkpointed) step's rollouts are generated again. checkpoint-kill: while the checkpoint
is being written; the last good checkpoint stays loadable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import kill_and_resume, kill_moments

pytestmark = pytest.mark.faults

KILLS = 10
CHECKPOINT_KILLS = [(2, 0.0), (3, 0.01), (4, 0.03)]  # (step being saved, delay in s)


@pytest.mark.parametrize(
    ("index", "target", "delay_s"),
    [(index, *moment) for index, moment in enumerate(kill_moments(KILLS))],
    ids=[f"#{index + 1}" for index in range(KILLS)],
)
def test_train_kill_resumes_to_the_uninterrupted_run(
    supervisor, fault_root: Path, reference_run: Path, record_property, index, target, delay_s
):
    workdir = fault_root / f"kill-{index}"
    problems, detail = kill_and_resume(supervisor, workdir, reference_run, target, delay_s)
    assert not problems, "; ".join(problems)
    record_property("detail", detail)


@pytest.mark.parametrize(
    ("index", "step", "delay_s"),
    [(index, *kill) for index, kill in enumerate(CHECKPOINT_KILLS)],
    ids=[f"#{index + 1}" for index in range(len(CHECKPOINT_KILLS))],
)
def test_checkpoint_kill_keeps_the_last_good_checkpoint_loadable(
    supervisor, fault_root: Path, reference_run: Path, record_property, index, step, delay_s
):
    workdir = fault_root / f"ckpt-kill-{index}"
    problems, detail = kill_and_resume(
        supervisor, workdir, reference_run, f"saving {step}", delay_s
    )
    assert not problems, "; ".join(problems)
    record_property("detail", f"last good checkpoint loadable; {detail}")
