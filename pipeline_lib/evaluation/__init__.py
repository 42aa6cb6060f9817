"""Benchmark metrics (metrics.py), the stage summaries DVC compares (summary.py), the
headline table (headline.py)."""
