"""GRPO updates in the training process, on the policy's own device, with AdamW."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import transformers

from pipeline_lib.update.core import (
    BatchNorms,
    UpdateBatch,
    UpdateSettings,
    apply_optimizer_step,
    backward_rows,
    run_ppo_steps,
    signal_rows,
    with_old_and_ref_logprobs,
)


def grpo_update(
    model: transformers.PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: UpdateBatch,
    settings: UpdateSettings,
    reference: torch.nn.Module | None = None,
) -> dict[str, float]:
    """One GRPO update over the batch in this process: `settings.optimizer_steps` PPO
    steps (one by default). Returns namespaced diagnostics."""
    started = time.perf_counter()
    stats = {
        "train/rows_with_signal": float(signal_rows(batch, settings).numel()),
        "train/loss": 0.0,
        "train/grad_norm": 0.0,
    }
    if stats["train/rows_with_signal"] == 0:
        return stats | {"train/update_seconds": time.perf_counter() - started}
    batch = with_old_and_ref_logprobs(model, reference, batch, settings)

    def step(members: torch.Tensor, rows: torch.Tensor) -> tuple[dict[str, float], float]:
        norms = BatchNorms.of(batch, rows, settings, members)
        return apply_optimizer_step(
            model,
            optimizer,
            lambda: backward_rows(model, batch, rows, settings, norms),
            lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm),
        )

    stats |= run_ppo_steps(batch, settings, step)
    return stats | {"train/update_seconds": time.perf_counter() - started}


class LocalUpdater:
    """GRPO updates in this process, on the policy's own device, with AdamW.

    `distributed.AccelerateUpdateGroup` does the same in several processes (FSDP on GPUs).
    """

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        *,
        learning_rate: float,
        settings: UpdateSettings,
        reference: torch.nn.Module | None = None,
    ) -> None:
        """`reference`: the frozen policy of the KL term (needed when `settings.kl_coef` > 0)."""
        if settings.kl_coef > 0 and reference is None:
            raise ValueError("kl_coef > 0 needs a reference policy")
        self._model = model
        self._settings = settings
        self._reference = reference
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)

    def update(self, batch: UpdateBatch) -> dict[str, float]:
        return grpo_update(self._model, self.optimizer, batch, self._settings, self._reference)

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def close(self) -> None:
        """Nothing to stop: everything lives in this process."""
