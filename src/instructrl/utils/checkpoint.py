"""Resumable training checkpoints, written atomically with a manifest of checksums.

Layout of a run directory::

    run_dir/checkpoints/step-000120/   one complete checkpoint (state.pt + manifest.json)
    run_dir/checkpoints/step-000240/   the newest; older ones beyond ``keep`` are deleted

A checkpoint is first written to a hidden temporary folder and renamed into place only after every file
is fsynced and the manifest (with SHA-256 of each file) is written, so a crash or a full disk never
leaves a half-written checkpoint under a real name. On load, checksums are verified; a corrupted or
truncated checkpoint is skipped with a warning and the previous good one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from instructrl.utils.io import _fsync_dir, atomic_write_json

MANIFEST = "manifest.json"
STATE = "state.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (any torch-serializable dict) as checkpoint ``step``; returns its folder."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state_path = tmp / STATE
        with open(state_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": {STATE: _sha256(state_path)}})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (by step)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify_checkpoint(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all(_sha256(path / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def load_latest_checkpoint(run_dir: str | Path) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that passes its checksums, as ``(step, state)``; None if there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        if not verify_checkpoint(path):
            warnings.warn(f"checkpoint {path} is corrupted or incomplete; falling back to an older one", stacklevel=2)
            continue
        try:
            state = torch.load(path / STATE, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file means "use the previous one"
            warnings.warn(f"checkpoint {path} could not be read ({e}); falling back to an older one", stacklevel=2)
            continue
        return int(json.loads((path / MANIFEST).read_text())["step"]), state
    return None
