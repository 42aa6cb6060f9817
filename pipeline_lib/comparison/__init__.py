"""Comparing allocation strategies: arm x seed runs (runs.py), paired statistics
(stats.py), plots (plots.py)."""
