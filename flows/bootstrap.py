"""Stage `bootstrap`: the starting policy as a Hugging Face checkpoint directory."""

from __future__ import annotations

from prefect import flow

from flows.common import load_stage_config, run_flow_cli
from tasks.bootstrap import build_tiny_policy, import_pretrained_policy
from tasks.tracking import stage_run


@flow(name="bootstrap", log_prints=True)
def bootstrap(params_path: str = "params.yaml", overrides: dict | None = None) -> str:
    """Build and warm up the embedded tiny policy, or import a pretrained one."""
    config = load_stage_config(params_path, overrides)
    with stage_run(config, "bootstrap") as tracker:
        if config.bootstrap.model == "tiny":
            path = build_tiny_policy(
                config.bootstrap,
                config.prepare.synthetic.levels,
                config.seed,
                config.threads,
                tracker,
            )
        else:
            path = import_pretrained_policy(config.bootstrap)
    print(f"starting policy -> {path}")
    return path


if __name__ == "__main__":
    run_flow_cli(bootstrap, section="bootstrap")
