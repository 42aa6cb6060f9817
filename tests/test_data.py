"""Prompt tables: sources (synthetic, JSONL, parquet, HF datasets) and the pandera schema."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline_lib.data.schema import PromptTableError, read_prompts, validate_prompts, write_prompts
from pipeline_lib.data.sources import SourceError, read_source
from pipeline_lib.data.synthetic import split_arithmetic


def test_shared_gsm8k_jsonl_reads_and_validates(shared_data):
    table = validate_prompts(
        read_source(str(shared_data / "gsm8k/test.jsonl"), limit=50), origin="gsm8k"
    )
    assert len(table) == 50 and table["level"].eq(-1).all()
    assert table.loc[0, "answer"] == "18"


def test_math500_keeps_levels_and_latex_answers(shared_data):
    table = validate_prompts(read_source(str(shared_data / "math500/test.jsonl")), origin="math500")
    assert len(table) == 500 and set(table["level"]) <= {1, 2, 3, 4, 5}
    assert table["answer"].str.contains("\\\\").any()


def test_parquet_round_trip(tmp_path):
    train, _ = split_arithmetic(64, 16, seed=1)
    path = write_prompts(train, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(read_prompts(path), validate_prompts(train, origin="x"))
    assert read_source(str(path)).shape[0] == 64


def test_hugging_face_datasets_source_loads_local_data_files(tmp_path):
    # The real `datasets.load_dataset` code path, on a local folder (the hub is unreachable here).
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [
        {"id": f"q{i}", "problem": f"{i}+{i}=", "answer": str(2 * i), "source": "t"}
        for i in range(5)
    ]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = validate_prompts(read_source(f"hf:{folder}", split="train"), origin="hf")
    assert table["answer"].tolist() == ["0", "2", "4", "6", "8"]


def test_hugging_face_saved_dataset_directory(tmp_path):
    import datasets

    frame = pd.DataFrame({"id": ["a"], "problem": ["1+1="], "answer": ["2"], "source": ["t"]})
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    assert read_source(f"hf:{tmp_path / 'saved'}").loc[0, "answer"] == "2"


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"id": "a", "problem": "  ", "answer": "1", "source": "s"}], "non_blank"),
        ([{"id": "a", "problem": "p", "source": "s"}], "answer"),
        (
            [
                {"id": "a", "problem": "p", "answer": "1", "source": "s"},
                {"id": "a", "problem": "q", "answer": "2", "source": "s"},
            ],
            "field_uniqueness",
        ),
        ([{"id": "a", "problem": "p", "answer": 7, "source": "s"}], "dtype"),
        ([{"id": "a", "problem": "p", "answer": None, "source": "s"}], "not_nullable"),
    ],
    ids=["empty-problem", "missing-answer", "duplicate-id", "numeric-answer", "null-answer"],
)
def test_malformed_tables_list_failure_cases_and_write_nothing(tmp_path, rows, expected):
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    target = tmp_path / "out.parquet"
    with pytest.raises(PromptTableError, match=expected) as error:
        write_prompts(read_source(str(source)), target)
    assert "invalid prompt table" in str(error.value)
    assert not target.exists()


def test_failed_write_keeps_the_previous_table(tmp_path):
    train, _ = split_arithmetic(8, 4, seed=0)
    path = write_prompts(train, tmp_path / "t.parquet")
    before = path.read_bytes()
    with pytest.raises(PromptTableError):
        write_prompts(train.assign(answer=""), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


@pytest.mark.parametrize(
    "source, match",
    [("missing.jsonl", "not found"), ("table.csv", "unsupported file type")],
)
def test_unreadable_sources_are_named(tmp_path, source, match):
    path = tmp_path / source
    if source.endswith(".csv"):
        path.write_text("a,b\n1,2\n")
    with pytest.raises(SourceError, match=match):
        read_source(str(path))


def test_train_problems_found_in_a_benchmark_are_dropped_or_fail_the_stage():
    import pandas as pd

    from pipeline_lib.data.overlap import OverlapError, remove_benchmark_overlap

    train = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "problem": ["What is 2+2?", "Name  a prime.", "x"],
            "answer": ["4", "2", "1"],
        }
    )
    bench = pd.DataFrame({"id": ["t"], "problem": ["  what is 2+2? "], "answer": ["4"]})
    tables, dropped = remove_benchmark_overlap({"train": train, "gsm8k": bench}, "drop")
    assert dropped == {"gsm8k": 1}
    assert tables["train"]["id"].tolist() == ["b", "c"]
    assert tables["gsm8k"] is bench
    with pytest.raises(OverlapError, match=r"1 training problems also appear in benchmark 'gsm8k'"):
        remove_benchmark_overlap({"train": train, "gsm8k": bench}, "error")
