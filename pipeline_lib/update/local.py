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
    signal_rows,
    summarize,
)


def grpo_update(
    model: transformers.PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: UpdateBatch,
    settings: UpdateSettings,
) -> dict[str, float]:
    """One on-policy update over the batch in this process; returns namespaced diagnostics."""
    started = time.perf_counter()
    rows = signal_rows(batch, settings)
    stats = {
        "train/rows_with_signal": float(rows.numel()),
        "train/loss": 0.0,
        "train/grad_norm": 0.0,
    }
    if rows.numel() == 0:
        return stats | {"train/update_seconds": time.perf_counter() - started}
    totals, grad_norm = apply_optimizer_step(
        model,
        optimizer,
        lambda: backward_rows(model, batch, rows, settings, BatchNorms.of(batch, rows)),
        lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm),
    )
    return (
        stats
        | summarize(totals)
        | {"train/grad_norm": grad_norm, "train/update_seconds": time.perf_counter() - started}
    )


class LocalUpdater:
    """GRPO updates in this process, on the policy's own device, with AdamW.

    `distributed.AccelerateUpdateGroup` does the same in several processes (FSDP on GPUs).
    """

    def __init__(
        self, model: transformers.PreTrainedModel, *, learning_rate: float, settings: UpdateSettings
    ) -> None:
        self._model = model
        self._settings = settings
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)

    def update(self, batch: UpdateBatch) -> dict[str, float]:
        return grpo_update(self._model, self.optimizer, batch, self._settings)

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def close(self) -> None:
        """Nothing to stop: everything lives in this process."""
