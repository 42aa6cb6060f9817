"""Benchmarks and measurements, run as `python -m bench.<name>`: they print numbers and
judge nothing (the harnesses that judge are tests)."""
