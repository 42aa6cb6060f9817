"""Fault-injection trials (issue 11.4): kill, starve and cut off the pipeline, check what survives.

Marked `faults` and skipped unless pytest is given `--opt-in faults` (`make fault-trials`).
"""
