"""dvc.yaml's deps cover what each stage runs: a change anywhere in it reruns the stage."""

from __future__ import annotations

import re

import pytest
import yaml

from pipeline_lib.import_graph import ROOT, closure, import_graph, module_files

# comparison/dvc.yaml holds the `compare` stage (outside `dvc repro`'s default target),
# comparison/<set>/dvc.yaml the other comparison sets; their paths are relative to the
# repository root (wdir), like the root file's.
STAGE_FILES = [ROOT / "dvc.yaml", ROOT / "comparison" / "dvc.yaml"]
STAGE_FILES += sorted((ROOT / "comparison").glob("*/dvc.yaml"))  # compare.sets' stages
STAGES = {
    name: stage
    for path in STAGE_FILES
    for name, stage in yaml.safe_load(path.read_text())["stages"].items()
}
# Files a stage's flow reads besides params.yaml and its modules.
READS = {"evaluate": ["metrics/train.json"]}


def stage_modules(stage: str) -> set[str]:
    command = STAGES[stage]["cmd"]
    match = re.fullmatch(r"python -m (flows\.\w+)( -S [\w.]+=\w+)*", command)
    assert match, f"stage {stage}: command {command!r} is not `python -m flows.<stage>`"
    return closure(import_graph(), match.group(1))


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_module_its_flow_imports(stage):
    deps = [str(dep) for dep in STAGES[stage]["deps"]]
    files = module_files()
    missing = sorted(
        str(files[name].relative_to(ROOT))
        for name in stage_modules(stage)
        if not covered(str(files[name].relative_to(ROOT)), deps)
    )
    missing += [path for path in READS.get(stage, []) if not covered(path, deps)]
    assert not missing, f"stage {stage} does not depend on: {missing}"


def test_the_compare_stage_runs_from_the_repository_root():
    assert STAGES["compare"]["wdir"] == ".."


def test_the_check_sees_lazy_imports_and_package_inits():
    """vLLM is imported inside a function; importing a module runs its package's __init__."""
    train = stage_modules("train")
    assert "pipeline_lib.rollout.vllm_engine" in train
    assert {"pipeline_lib", "pipeline_lib.rollout", "tasks", "flows"} <= train
    assert not covered("pipeline_lib/rewards", ["pipeline_lib/evaluation/metrics.py"])


def test_each_comparison_set_has_its_own_stage_file_and_the_default_file_runs_one_stage():
    from pipeline_lib.config import parse_config

    sets = parse_config({}).compare.sets
    default = yaml.safe_load((ROOT / "comparison" / "dvc.yaml").read_text())["stages"]
    assert list(default) == ["compare"]  # `dvc repro comparison/dvc.yaml` runs no other set
    for name in sets:
        stage = STAGES[f"compare-{name}"]
        assert stage["wdir"] == "../.."
        assert stage["cmd"] == f"python -m flows.compare -S compare.set={name}"
        metrics = [next(iter(item)) for item in stage["metrics"]]
        assert metrics == [f"metrics/compare_{name}.json"]
        assert "outs" not in stage  # the runs folder is the default stage's output
