"""What every stage flow shares: config loading once, and the command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from pipeline_lib.adapters.redaction import install_log_redaction
from pipeline_lib.config import ConfigError, PipelineConfig, describe_section, load_config


def load_stage_config(params_path: str, overrides: dict[str, Any] | None) -> PipelineConfig:
    """Read params.yaml (plus dotted overrides) once; a bad key fails here, before compute."""
    return load_config(params_path, overrides)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`train.steps=10` -> {'train.steps': 10}; values are parsed as JSON when they can be."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_flow_cli(flow_fn: Callable[..., Any], section: str | None = None) -> None:
    """`python -m flows.<stage> [--params params.yaml] [-S key=value ...]`.

    `--help` lists every key of the stage's params section (and the top level) with
    its type, allowed values, default and description.
    """
    keys = describe_section(PipelineConfig)
    if section is not None:
        keys = [
            line for line in keys if line.startswith(f"  {section}.") or "." not in line.split()[0]
        ]
    parser = argparse.ArgumentParser(
        description=flow_fn.__doc__,
        epilog="params (override with -S key=value):\n" + "\n".join(keys),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. -S train.steps=10 (repeatable)",
    )
    args = parser.parse_args()
    install_log_redaction()  # no S3 key or token in the stage's log, Prefect's included
    try:
        overrides = parse_overrides(args.set)
        # Validate before Prefect starts its server: a typo costs no start-up time.
        load_config(args.params, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    flow_fn(params_path=args.params, overrides=overrides or None)
