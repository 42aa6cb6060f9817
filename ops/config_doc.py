"""Write docs/configuration.md from the params models of pipeline_lib/config.py (never by hand).

    python -m ops.config_doc            # rewrite docs/configuration.md (`make docs`)
    python -m ops.config_doc --check    # exit 1 if docs/configuration.md is stale

One table per params.yaml section, in pipeline order, then the top-level keys: each key
with its type and bounds, its default and the description written under its field.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline_lib.config import PipelineConfig

OUTPUT = Path("docs/configuration.md")
# Pipeline order (= dvc.yaml's stages), then the sections no stage owns.
SECTION_ORDER = ("prepare", "bootstrap", "train", "evaluate", "compare", "tracking")

INTRO = """\
# Configuration

`params.yaml` is the one place for settings. It is loaded once into frozen, validated
models (`pipeline_lib/config.py`): an unknown key or a bad value fails before any compute,
naming the key and what is allowed. Each section below is the `params.yaml` section of
the DVC stage and Prefect flow of the same name; `python -m flows.<stage> --help` prints
the same keys in the terminal, and `dvc exp run -S <key>=<value>` varies one for an
experiment ([the pipeline](pipeline.md#configuration-and-experiments) shows how).

This page is generated from those models by `python -m ops.config_doc` (`make docs`);
`tests/test_docs.py` fails when it is stale, so edit the field descriptions in
`pipeline_lib/config.py`, not this file."""


def type_name(annotation: Any) -> str:
    """A field's type in words: `int`, `one of a, b`, `list of int`, `float or null`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(value) for value in args)
    if origin in (Union, types.UnionType):
        kinds = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if model_of(annotation)[0] is not None:
            return "list of mappings (keys below)"
        if len(args) == 2 and args[1] is Ellipsis:
            item = type_name(args[0])
            return f"list, each {item}" if item.startswith("one of") else f"list of {item}"
        return "[" + ", ".join(type_name(arg) for arg in args) + "]"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: FieldInfo) -> str:
    """The field's numeric and length constraints, e.g. `> 0`, `at least 1 item`."""
    parts = [
        f"{symbol} {getattr(item, attr)}"
        for item in field.metadata
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(item, attr, None) is not None
    ]
    parts += [
        f"at least {item.min_length} item{'s' if item.min_length != 1 else ''}"
        for item in field.metadata
        if getattr(item, "min_length", None) is not None
    ]
    return ", ".join(parts)


def plain(value: Any) -> Any:
    """`value` with tuples as lists, the way yaml.safe_dump takes it."""
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def default_text(field: FieldInfo) -> str:
    """The default as params.yaml would write it (YAML flow style), or `required`."""
    if field.is_required():
        return "required"
    default = plain(field.get_default(call_default_factory=True))
    text = yaml.safe_dump(default, default_flow_style=True, width=10**6)
    return f"`{text.removesuffix(chr(10)).removesuffix(chr(10) + '...')}`"


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def model_of(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The params model a field holds, and the key suffix for it (`[]` for a list of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    args = get_args(annotation)
    if get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        inner, _ = model_of(args[0])
        if inner is not None:
            return inner, "[]"
    return None, ""


def key_row(key: str, field: FieldInfo) -> str:
    """The table row of one key: key, type with bounds, default, description."""
    kind, limits = type_name(field.annotation), bounds(field)
    kind = f"{kind} ({limits})" if limits else kind
    return (
        f"| `{key}` | {cell(kind)} | {cell(default_text(field))} "
        f"| {cell(field.description or '')} |"
    )


def field_rows(model: type[BaseModel], prefix: str) -> list[str]:
    """One table row per key of `model`, nested models flattened to dotted keys."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner, suffix = model_of(field.annotation)
        if inner is not None and not suffix:
            rows += field_rows(inner, f"{key}.")
            continue
        rows.append(key_row(key, field))
        if inner is not None:
            rows += field_rows(inner, f"{key}{suffix}.")
    return rows


def summary_of(model: type[BaseModel]) -> str:
    """The model's docstring as one paragraph."""
    return " ".join((inspect.getdoc(model) or "").split())


TABLE_HEADER = "| key | type | default | description |\n|---|---|---|---|"


def render() -> str:
    """The whole of docs/configuration.md."""
    sections = {
        name: model_of(field.annotation)[0]
        for name, field in PipelineConfig.model_fields.items()
        if model_of(field.annotation)[0] is not None
    }
    unknown = set(sections) - set(SECTION_ORDER)
    if unknown:
        raise ValueError(f"sections missing from SECTION_ORDER: {sorted(unknown)}")
    parts = [INTRO]
    for name in SECTION_ORDER:
        model = sections[name]
        rows = "\n".join(field_rows(model, f"{name}."))
        parts.append(f"## `{name}`\n\n{summary_of(model)}\n\n{TABLE_HEADER}\n{rows}")
    top_level = "\n".join(
        key_row(name, field)
        for name, field in PipelineConfig.model_fields.items()
        if name not in sections
    )
    parts.append(f"## Top-level keys\n\nKeys outside any section.\n\n{TABLE_HEADER}\n{top_level}")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} is stale: run `python -m ops.config_doc` (make docs)")
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
