"""Device selection shared by every stage."""

from __future__ import annotations

import torch

from instructrl.errors import UserFacingError

DEVICE_HELP = "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."


def valid_device_name(name: str) -> bool:
    return name in ("auto", "cpu") or name.split(":")[0] == "cuda"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; a CUDA request without CUDA is a clear error."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserFacingError(f"device={name!r} but CUDA is not available; use device=cpu")
    return torch.device(name)
