"""Tooling behind the Makefile targets, run as `python -m ops.<name>` (no sys.path edits)."""
