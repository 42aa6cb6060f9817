"""Adapters: where the library meets the outside world.

MLflow (mlflow_tracker.py: the `Tracker` of a run; mlflow_runs.py: finding, opening and
linking runs), the DVC remote on S3 (dvc_remote.py), child processes (processes.py),
atomic files (atomic.py) and secret redaction (redaction.py). The method modules
(allocation, grpo, status, rewards.answers, evaluation.metrics, comparison.stats) never
import these; tests/test_code_shape.py checks it.
"""
