"""A checkpoint written to a full tmpfs: the save fails, the last good checkpoint is intact
and loadable, and the next save works once there is room.

Needs root for `mount -t tmpfs` (as `make fault-trials` runs); without it the trials fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import FINGERPRINT, tree_digest

pytestmark = pytest.mark.faults


@contextlib.contextmanager
def tmpfs(root: Path, size: str = "4m") -> Iterator[Path]:
    """A fresh tmpfs of `size` mounted under `root`, unmounted and removed afterwards."""
    mount = Path(tempfile.mkdtemp(prefix="disk-full-", dir=root))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        check=True,
        capture_output=True,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


def fill_disk(mount: Path, room_bytes: int) -> Path:
    """Fill `mount` with one file, then shrink it to leave `room_bytes` free."""
    filler = mount / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    os.truncate(filler, max(filler.stat().st_size - room_bytes + free, 0))
    return filler


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9], ids=["#1", "#2", "#3"])
def test_disk_full_save_fails_and_keeps_the_last_good_checkpoint(
    fault_root: Path, record_property, fraction: float
):
    """Checkpoints on a 4 MiB tmpfs, filled so that the next save runs out of space."""
    import torch

    from pipeline_lib.config import TinyModelParams
    from pipeline_lib.policy.tiny import build_tiny_qwen2
    from pipeline_lib.policy.tokenizer import build_char_tokenizer
    from pipeline_lib.training import DirectoryCheckpointer, TrainState

    with tmpfs(fault_root) as mount:
        tokenizer = build_char_tokenizer()
        params = TinyModelParams(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
        model = build_tiny_qwen2(tokenizer, params, seed=0)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        optimizer.step()
        checkpointer = DirectoryCheckpointer(mount / "state", FINGERPRINT)
        good = TrainState(step=1, history=[{"step": 1.0}], optimizer_state=optimizer.state_dict())
        checkpointer.save(good, model, tokenizer)
        size = sum(p.stat().st_size for p in checkpointer.path.rglob("*") if p.is_file())
        before = tree_digest(checkpointer.path)
        good_weights = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        filler = fill_disk(mount, int(size * fraction))  # room for `fraction` of a checkpoint
        second = TrainState(step=2, history=[{"step": 2.0}], optimizer_state=optimizer.state_dict())
        try:
            checkpointer.save(second, model, tokenizer)
            pytest.fail(f"the save on a full disk did not fail (room {fraction:.0%})")
        except Exception as error:  # noqa: BLE001 - safetensors and torch raise their own
            # types on ENOSPC (torch: "unexpected pos" when its zip writer comes up short)
            code = errno.errorcode.get(getattr(error, "errno", None) or 0, "")
            failure = f"save failed with {type(error).__name__} {code}".strip()
        leftovers = [p.name for p in checkpointer.state_dir.iterdir() if p.name != "checkpoint"]
        restored = build_tiny_qwen2(tokenizer, params, seed=1)
        state = checkpointer.restore(restored)
        problems = []
        if leftovers:
            problems.append(f"left behind {leftovers}")
        if state is None or state.step != 1:
            problems.append(f"restored step {getattr(state, 'step', None)}, wanted 1")
        if tree_digest(checkpointer.path) != before:
            problems.append("the last good checkpoint's files changed")
        differing = [
            k for k, v in restored.state_dict().items() if not torch.equal(v, good_weights[k])
        ]
        if differing:
            problems.append(f"restored weights differ: {differing[:3]}")
        filler.unlink()
        checkpointer.save(second, model, tokenizer)
        if checkpointer.saved_step() != 2:
            problems.append("saving again after freeing space failed")
    assert not problems, "; ".join(problems)
    record_property(
        "detail",
        f"{failure} with room for {fraction:.0%} of a {size // 1024} KiB checkpoint; "
        "nothing left behind, step-1 checkpoint intact and loadable, next save works",
    )
