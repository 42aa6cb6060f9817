"""Security basics (issue 11.6): no secret in the repository, in MLflow or in logs; servers on
loopback by default; checkpoints load as safetensors; no `torch.load` that can run code."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_lib.adapters import redaction
from pipeline_lib.adapters.dvc_remote import PushError
from pipeline_lib.adapters.mlflow_tracker import MlflowTracker
from pipeline_lib.adapters.redaction import (
    install_log_redaction,
    redact,
    redact_mapping,
    secret_values,
)
from pipeline_lib.config import TinyModelParams
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.training import DirectoryCheckpointer, TrainState
from tests.conftest import REPO_ROOT

ACCESS_KEY = "AKIDTESTKEY0123"
SECRET_KEY = "s3cr3t/Value+With=Symbols"


def tracked_files(*patterns: str) -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", *patterns],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [REPO_ROOT / name for name in listed.split("\0") if name]


@pytest.fixture
def s3_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


# --------------------------------------------------------------------------- secrets


def test_secret_names_are_recognised_without_catching_ordinary_words() -> None:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "remote.s3.password"):
        assert redaction.is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "train.max_new_tokens", "budget_unit", "AWS_REGION"):
        assert not redaction.is_secret_name(name), name


def test_redact_masks_secret_values_and_url_passwords() -> None:
    secrets = secret_values(
        {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "TOKENIZERS_PARALLELISM": "false"}
    )
    assert secrets == [SECRET_KEY]
    text = f"key {SECRET_KEY} at http://user:pw@127.0.0.1:9000/b; false stays"
    assert redact(text, secrets) == "key *** at http://***@127.0.0.1:9000/b; false stays"
    assert redact_mapping({"s3.secret_access_key": "x", "note": SECRET_KEY}, secrets) == {
        "s3.secret_access_key": "***",
        "note": "***",
    }


def test_s3_keys_are_redacted_from_mlflow_params_and_tags(tmp_path: Path, s3_keys) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MlflowTracker.start(uri, "security", "run", artifact_location=tmp_path.as_uri()) as run:
        run.log_params(
            {
                "prepare": {"source": f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/train.jsonl"},
                "storage": {"secret_access_key": "plain-secret", "endpoint": "http://127.0.0.1"},
                "note": f"keys {ACCESS_KEY} {SECRET_KEY}",
            }
        )
        run.set_tags(
            {"error": f"InvalidAccessKeyId {ACCESS_KEY}", "aws_session_token": "session-tok-123"}
        )
        run_id = run.run_id
    data = MlflowClient(tracking_uri=uri).get_run(run_id).data
    stored = " ".join([*data.params.values(), *data.tags.values()])
    for secret in (ACCESS_KEY, SECRET_KEY, "plain-secret", "session-tok-123"):
        assert secret not in stored, secret
    assert data.params["storage.endpoint"] == "http://127.0.0.1"  # ordinary values untouched


def test_s3_keys_are_redacted_from_log_records(caplog: pytest.LogCaptureFixture, s3_keys) -> None:
    factory = logging.getLogRecordFactory()
    try:
        install_log_redaction()
        install_log_redaction()  # twice: still one layer
        logger = logging.getLogger("knapsack-rl.test.security")
        with caplog.at_level(logging.INFO):
            logger.info("pushing with key %s / %s", ACCESS_KEY, SECRET_KEY)
            try:
                raise RuntimeError(f"SignatureDoesNotMatch for {SECRET_KEY}")
            except RuntimeError:
                logger.exception("push failed")
    finally:
        logging.setLogRecordFactory(factory)
    assert "pushing with key *** / ***" in caplog.text
    assert "SignatureDoesNotMatch for ***" in caplog.text
    assert ACCESS_KEY not in caplog.text and SECRET_KEY not in caplog.text


def test_storage_errors_do_not_quote_s3_keys(s3_keys) -> None:
    error = PushError(f"dvc push failed: InvalidAccessKeyId: {ACCESS_KEY}")
    assert ACCESS_KEY not in str(error) and "***" in str(error)


def test_no_credentials_are_committed() -> None:
    patterns = {
        "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
        "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
        "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{34}\b"),
    }
    found = []
    for path in tracked_files():
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        found += [
            f"{path.relative_to(REPO_ROOT)}: {kind}"
            for kind, p in patterns.items()
            if p.search(text)
        ]
    assert found == []


# --------------------------------------------------------------------------- servers


def test_every_server_command_binds_loopback_by_default() -> None:
    """`--host X` in the Makefile and scripts is 127.0.0.1; Compose publishes on 127.0.0.1."""
    tooling = tracked_files("ops/*.py", "bench/*.py")
    texts = {p: p.read_text() for p in [REPO_ROOT / "Makefile", *tooling]}
    hosts = []
    for path, text in texts.items():
        hosts += [(path.name, h) for h in re.findall(r"--host[\"',\s=]+([\w.$()\-]+)", text)]
        hosts += [(path.name, h) for h in re.findall(r"\bhost=[\"']([\w.]+)[\"']", text)]
    assert hosts, "no server command found: the pattern is out of date"
    assert [(name, host) for name, host in hosts if host != "127.0.0.1"] == []
    compose = yaml.safe_load((REPO_ROOT / "docker/compose.yaml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)


# --------------------------------------------------------------------------- loading


def test_every_torch_load_passes_weights_only_true() -> None:
    offenders = []
    for path in tracked_files("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert offenders == []


def test_checkpoints_hold_safetensors_and_refuse_pickled_weights(tmp_path: Path) -> None:
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1), seed=0)
    checkpointer = DirectoryCheckpointer(tmp_path, fingerprint="f")
    checkpointer.save(
        TrainState(step=1, history=[{"step": 1.0}], optimizer_state={}), model, tokenizer
    )
    policy = checkpointer.path / "policy"
    assert (policy / "model.safetensors").is_file()
    assert not [p.name for p in policy.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    assert (
        checkpointer.restore(build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1))).step == 1
    )
    # A checkpoint whose weights are a pickle (what torch.save writes) is not loaded.
    (policy / "model.safetensors").unlink()
    torch.save(model.state_dict(), policy / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        checkpointer.restore(build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1)))
