"""Prefect flows, one per DVC stage: `python -m flows.<stage>`."""
