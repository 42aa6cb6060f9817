"""20+ malformed params and data: each fails before compute with an error naming the
problem, and the previous outputs are unchanged.

Each bad input runs the prepare stage's code path against a good previous output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.harness import tree_digest

pytestmark = pytest.mark.faults

GOOD_PARAMS = """
seed: 0
prepare:
  source: {source}
  synthetic: {{train_prompts: 32, benchmark_prompts: 8}}
  output_dir: {output}
"""

PARAM_CASES: list[tuple[str, str, str]] = [
    # (name, params.yaml text appended to / replacing the good one, text the error must name)
    ("unknown top-level key", "trian: {steps: 3}\n", "trian"),
    ("unknown nested key", "train: {stepz: 3}\n", "train.stepz"),
    ("wrong type: steps", "train: {steps: ten}\n", "train.steps"),
    ("wrong type: learning_rate", "train: {learning_rate: [0.1]}\n", "train.learning_rate"),
    ("out of range: steps 0", "train: {steps: 0}\n", "train.steps"),
    ("out of range: temperature", "train: {temperature: -1.0}\n", "train.temperature"),
    (
        "out of range: fallback_confidence",
        "train: {fallback_confidence: 1.5}\n",
        "fallback_confidence",
    ),
    ("out of range: threads", "threads: 0\n", "threads"),
    ("min_rollouts > max_rollouts", "train: {min_rollouts: 16, max_rollouts: 4}\n", "min_rollouts"),
    (
        "budget below the floor",
        "train: {rollouts_per_prompt: 1, min_rollouts: 2}\n",
        "min_rollouts",
    ),
    ("pass@k above samples", "evaluate: {samples_per_prompt: 2, pass_at: [1, 4]}\n", "pass_at"),
    ("unknown strategy", "train: {strategies: [greedy]}\n", "strategies"),
    ("unknown backend", "train: {backend: tpu}\n", "backend"),
    ("params not a mapping", "REPLACE:- a\n- b\n", "mapping"),
    ("invalid YAML", "REPLACE:train: {steps: [1, 2\n", "line"),
]

ROW = b'{"id": "a", "problem": "1+1", "answer": "2", "source": "t"'  # a good row, unclosed

DATA_CASES: list[tuple[str, str, bytes, str]] = [
    # (name, file suffix, file content, text the error must name)
    ("empty problem", ".jsonl", ROW.replace(b'"1+1"', b'" "') + b"}\n", "problem"),
    ("missing answer column", ".jsonl", ROW.replace(b'"answer": "2", ', b"") + b"}\n", "answer"),
    ("null answer", ".jsonl", ROW.replace(b'"2"', b"null") + b"}\n", "answer"),
    ("duplicate ids", ".jsonl", ROW + b"}\n" + ROW.replace(b"1+1", b"2+2") + b"}\n", "id"),
    ("wrong type: numeric answer", ".jsonl", ROW.replace(b'"2"', b"2") + b"}\n", "answer"),
    ("wrong type: level", ".jsonl", ROW + b', "level": "hard"}\n', "level"),
    ("undecodable file", ".jsonl", b"\xff\xfe\x00garbage\x80\x81\n", "could not read"),
    ("empty file", ".jsonl", b"", "id"),
    ("unsupported file type", ".csv", b"id,problem,answer\na,1+1,2\n", "unsupported file type"),
    ("missing file", "MISSING", b"", "not found"),
]

GOOD_ROW = b'{"id": "a", "problem": "1+1", "answer": "2", "source": "t"}\n'


def prepare(params: Path) -> None:
    """The prepare stage's code path: load the config, read, de-overlap, write the tables."""
    from pipeline_lib.config import load_config
    from pipeline_lib.data.overlap import remove_benchmark_overlap
    from tasks.prepare import load_tables, write_tables

    config = load_config(params)  # params errors: before any data is read
    tables = load_tables.fn(config.prepare, config.seed)
    tables, _ = remove_benchmark_overlap(tables, config.prepare.on_overlap)
    write_tables.fn(tables, config.prepare.output_dir)


class Workdir:
    """A folder with a good params file whose prepared output already exists."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.output = root / "prepared"
        self.good = root / "good.yaml"
        root.mkdir(parents=True)
        self.good.write_text(GOOD_PARAMS.format(source="synthetic", output=self.output))
        prepare(self.good)
        self.before = tree_digest(self.output)

    def params(self, name: str, source: Path | str, extra: str = "") -> Path:
        path = self.root / name
        path.write_text(GOOD_PARAMS.format(source=source, output=self.output) + extra)
        return path


@pytest.fixture(scope="module")
def workdir(fault_root: Path) -> Workdir:
    return Workdir(fault_root / "malformed")


@pytest.fixture
def expect_failure(workdir: Workdir, record_property) -> Callable[[Path, str], None]:
    """Assert that preparing `params` fails naming `must_name` and changes no output."""

    def check(params: Path, must_name: str) -> None:
        try:
            prepare(params)
        except Exception as error:  # noqa: BLE001 - any clear error is a pass
            message = f"{type(error).__name__}: {error}"
        else:
            pytest.fail("accepted a malformed input")
        problems = []
        if must_name.lower() not in message.lower():
            problems.append(f"error does not name {must_name!r}: {message[:300]}")
        if tree_digest(workdir.output) != workdir.before:
            problems.append("the previous outputs changed")
        assert not problems, "; ".join(problems)
        record_property("detail", f"refused: {' '.join(message.split())[:150]}")

    return check


@pytest.mark.parametrize(
    ("index", "text", "must_name"),
    [(index, text, must_name) for index, (_, text, must_name) in enumerate(PARAM_CASES)],
    ids=[name for name, _, _ in PARAM_CASES],
)
def test_malformed_params_fail_before_compute_naming_the_problem(
    workdir: Workdir, expect_failure, index: int, text: str, must_name: str
):
    params = workdir.root / f"params-{index}.yaml"
    replace = text.startswith("REPLACE:")
    params.write_text(text.removeprefix("REPLACE:") if replace else workdir.good.read_text() + text)
    expect_failure(params, must_name)


@pytest.mark.parametrize(
    ("index", "suffix", "content", "must_name"),
    [(index, *case[1:]) for index, case in enumerate(DATA_CASES)],
    ids=[case[0] for case in DATA_CASES],
)
def test_malformed_data_fails_before_compute_naming_the_problem(
    workdir: Workdir, expect_failure, index: int, suffix: str, content: bytes, must_name: str
):
    source = workdir.root / f"data-{index}{'.jsonl' if suffix == 'MISSING' else suffix}"
    if suffix != "MISSING":
        source.write_bytes(content)
    expect_failure(workdir.params(f"data-params-{index}.yaml", source), must_name)


def test_bad_benchmark_beside_good_train_writes_nothing_and_names_the_benchmark(
    workdir: Workdir, expect_failure
):
    good_source = workdir.root / "good.jsonl"
    good_source.write_bytes(GOOD_ROW)
    bad_bench = workdir.root / "bad-bench.jsonl"
    bad_bench.write_bytes(b'{"id": "b", "problem": "", "answer": "2", "source": "t"}\n')
    extra = f"  benchmarks: [{{name: broken_bench, source: {bad_bench}}}]\n"
    expect_failure(workdir.params("bench-params.yaml", good_source, extra), "broken_bench")


def test_benchmark_overlapping_train_fails_with_on_overlap_error(workdir: Workdir, expect_failure):
    """A benchmark sharing a problem with train (spacing differs), on_overlap: error."""
    good_source = workdir.root / "good.jsonl"
    good_source.write_bytes(GOOD_ROW)
    overlap_bench = workdir.root / "overlap-bench.jsonl"
    overlap_bench.write_bytes(b'{"id": "z", "problem": " 1+1\\t", "answer": "2", "source": "t"}\n')
    extra = f"  benchmarks: [{{name: leaky_bench, source: {overlap_bench}}}]\n"
    extra += "  on_overlap: error\n"
    expect_failure(workdir.params("overlap-params.yaml", good_source, extra), "leaky_bench")
