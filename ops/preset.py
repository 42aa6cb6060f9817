"""Presets from the command line: check one, print its `dvc exp run` arguments, run it.

python -m ops.preset check NAME      # validate, no compute or network; print the config
python -m ops.preset dvc-args NAME   # `-S key=value ...`, shell-quoted, for dvc exp run
python -m ops.preset run NAME        # dvc exp run with the preset (what make run PRESET= does)
python -m ops.preset list
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from flows.pipeline import dvc_command
from pipeline_lib.config import ConfigError
from pipeline_lib.presets import (
    budget_lines,
    check_problems,
    load_preset,
    preset_config,
    preset_names,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def check(name: str, params: Path) -> int:
    """Print the resolved configuration and the budget; 1 with every problem named."""
    config = preset_config(yaml.safe_load(params.read_text()) or {}, name)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    print("\n".join(f"# {line}" for line in budget_lines(config)))
    problems = check_problems(config, params.resolve().parent)
    for problem in problems:
        print(f"error: preset {name}: {problem}", file=sys.stderr)
    print(f"preset {name}: {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["check", "dvc-args", "run", "list"])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    args = parser.parse_args(argv)
    if args.action == "list":
        print("\n".join(preset_names()))
        return 0
    if args.name is None:
        parser.error(f"{args.action} needs a preset name; known: {', '.join(preset_names())}")
    try:
        if args.action == "check":
            return check(args.name, args.params)
        preset_config(yaml.safe_load(args.params.read_text()) or {}, args.name)
        command = dvc_command(load_preset(args.name))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.action == "dvc-args":
        print(shlex.join(command[3:]))
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
