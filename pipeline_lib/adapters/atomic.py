"""Atomic writes: a reader (or a resumed run) sees the old version or the new one, never half.

Every writer of pipeline state goes through these two helpers: the training
checkpoint, policy checkpoints, the prompt-status table and the prompt tables.
Data goes to a temporary sibling first (same filesystem, so the rename is atomic);
a crash, a full disk or an exception leaves the previous version in place and no
temporary files behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on success it takes `path`'s place.

    A folder cannot be renamed over a non-empty one, so an existing `path` is first
    renamed aside, then the staging folder renamed in, then the old one removed: at
    every moment one complete version sits at `path` or at its `.old-` name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def recover_directory(path: str | os.PathLike[str]) -> None:
    """Put back a folder left renamed aside by a crash inside `atomic_directory`'s swap.

    Between its two renames only the `.old-` copy exists; restore it, and remove
    staging folders of writes that never finished.
    """
    target = Path(path)
    if not target.parent.exists():
        return
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    retired = sorted(target.parent.glob(f".{target.name}.old-*"))
    if retired and not target.exists():
        os.replace(retired[-1], target)
        retired = retired[:-1]
    for old in retired:
        shutil.rmtree(old, ignore_errors=True)
