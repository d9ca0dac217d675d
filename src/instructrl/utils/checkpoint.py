"""Resumable training checkpoints, written atomically with a manifest of checksums.

Layout of a run directory::

    run_dir/checkpoints/step-000120/   one complete checkpoint (state.pt + manifest.json)
    run_dir/checkpoints/step-000240/   the newest; older ones beyond ``keep`` are deleted

A checkpoint is first written to a hidden temporary folder and renamed into place only after every file
is fsynced and the manifest (with SHA-256 of each file) is written, so a crash or a full disk never
leaves a half-written checkpoint under a real name. On load, checksums are verified; a corrupted or
truncated checkpoint is skipped with a warning and the previous good one is used. A state holding NaN/inf
tensors is never written (:func:`~instructrl.utils.guards.require_finite_weights`), and a full disk raises a
:class:`~instructrl.errors.UserFacingError` that says the previous checkpoint is intact.
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

from instructrl.errors import UserFacingError
from instructrl.utils.guards import is_disk_full, require_finite_weights
from instructrl.utils.io import _fsync_dir, atomic_write_json
from instructrl.utils.kill_hook import kill_point

MANIFEST = "manifest.json"
STATE = "state.pt"
SHARDED = "sharded"
"""Folder of a sharded run's checkpoint holding the entries every rank wrote (``torch.distributed.checkpoint``)."""
SHARDED_ENTRIES = "sharded_entries"
"""Entry of a sharded run's ``state.pt`` listing the entries written into :data:`SHARDED`."""
SHARDED_FOLDER = "sharded_folder"
"""Entry added on reading a sharded run's checkpoint: the path of its :data:`SHARDED` folder."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2, attach: Path | None = None
) -> Path:
    """Write ``state`` (any torch-serializable dict) as checkpoint ``step``; returns its folder.

    ``attach``: a folder already written (a sharded run's ``torch.distributed.checkpoint`` shards) moved into the
    checkpoint as ``sharded/``, its files covered by the manifest like ``state.pt``."""
    require_finite_weights(state, f"checkpoint {step}")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        state_path = tmp / STATE
        _write_state(state_path, state)
        files = {STATE: _sha256(state_path)}
        if attach is not None:
            os.replace(attach, tmp / SHARDED)
            files.update(
                {str(f.relative_to(tmp)): _sha256(f) for f in sorted((tmp / SHARDED).rglob("*")) if f.is_file()}
            )
        kill_point("checkpoint-write", step, run_dir)
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": files})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise UserFacingError(
                f"no space left on the device while writing checkpoint {step} in {root} ({e}); the previous "
                "checkpoint is intact. Free some space and run the same command again to resume from it."
            ) from e
        raise
    kill_point("checkpoint-done", step, run_dir)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_state(path: Path, state: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_temporaries(root: Path) -> None:
    """Remove half-written checkpoints left by a killed process (one writer per run directory)."""
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


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
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unreadable or malformed manifest
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
        if (path / SHARDED).is_dir():  # read later, into the run's own (sharded) state: Runtime.read_sharded_entries
            state[SHARDED_FOLDER] = path / SHARDED
        return int(json.loads((path / MANIFEST).read_text())["step"]), state
    return None
