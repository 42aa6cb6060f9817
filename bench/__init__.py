"""Benchmarks and measurements, run as `python -m bench.<name>`: they print numbers, they judge nothing."""
