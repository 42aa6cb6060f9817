"""GRPO training with Knapsack allocation: the loop (`loop`), its parts (`steps`), its state."""

from pipeline_lib.training.loop import TrainingResult, TrainingRun, history_accuracy, train_policy
from pipeline_lib.training.state import (
    Checkpointer,
    DirectoryCheckpointer,
    NullCheckpointer,
    TrainState,
)
from pipeline_lib.training.steps import heldout_accuracy, step_prompts

__all__ = [
    "Checkpointer",
    "DirectoryCheckpointer",
    "NullCheckpointer",
    "TrainState",
    "TrainingResult",
    "TrainingRun",
    "heldout_accuracy",
    "history_accuracy",
    "step_prompts",
    "train_policy",
]
