"""The GRPO policy update: one interface (`Updater`), two implementations.

- `core`: the batch, the micro-batched loss and the optimiser step both share;
- `local`: `LocalUpdater`, the update in the training process;
- `distributed`: `AccelerateUpdateGroup`, the update in N worker processes (FSDP on GPUs).

The caller (the train task) picks one; nothing here imports the worker group, which
starts processes and needs accelerate, unless it is asked for.
"""

from pipeline_lib.update.core import (
    UpdateBatch,
    Updater,
    UpdateSettings,
    build_update_batch,
    token_logprobs,
)
from pipeline_lib.update.local import LocalUpdater, grpo_update

__all__ = [
    "LocalUpdater",
    "UpdateBatch",
    "UpdateSettings",
    "Updater",
    "build_update_batch",
    "grpo_update",
    "token_logprobs",
]
