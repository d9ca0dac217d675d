"""Guards every training stage shares: non-finite steps, NaN weights, out-of-memory and full disks.

* :class:`NonFiniteGuard` skips an optimizer step whose loss or gradient norm is NaN/inf (counted and
  reported) and stops the run with a clear message after ``max_nonfinite_steps`` such steps in a row.
* :func:`require_finite_weights` refuses to save a model (or checkpoint) holding NaN/inf weights.
* :func:`out_of_memory_advice` turns an out-of-memory error into a :class:`UserFacingError` that names the
  config fields to lower; :func:`is_disk_full` recognises a full disk or an exhausted quota.
"""

from __future__ import annotations

import contextlib
import errno
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from instructrl.errors import UserFacingError

_OOM_ERRORS: tuple[type[BaseException], ...] = (MemoryError,) + tuple(
    cls for cls in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if cls
)
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")
"""Phrases of the RuntimeErrors torch raises when an allocation fails (CUDA, CPU allocator, MPS)."""


def is_finite(value: Any) -> bool:
    """True for None, a finite number, or a tensor whose every element is finite."""
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))


@dataclass
class NonFiniteGuard:
    """Skips updates with a NaN/inf loss or gradient; stops after ``max_in_a_row`` of them in a row.

    One bad batch (an overflow, a degenerate sample) should not end a long run, but a run whose every step
    is non-finite is diverging, and continuing would only burn compute. The counters are part of a
    checkpoint, so a resumed run stops at exactly the step the uninterrupted one would have.
    """

    max_in_a_row: int
    """Stop when this many optimizer steps in a row were non-finite."""
    field: str = "run.max_nonfinite_steps"
    """The config field holding ``max_in_a_row`` (named in the error message)."""
    unit: str = "step"
    """What the ``step`` numbers passed in count, for messages (PPO: "iteration", several steps each)."""
    skipped: int = 0
    """Steps skipped so far in this run."""
    in_a_row: int = 0
    """Non-finite steps since the last finite one."""

    def step_is_finite(self, step: int, **values: Any) -> bool:
        """True when every value (loss, gradient norm, ...) is finite; otherwise count, report, maybe stop.

        The caller skips its optimizer step on False (gradients are discarded by the next ``zero_grad``).
        """
        bad = sorted(name for name, value in values.items() if not is_finite(value))
        if not bad:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        print(
            f"warning: {self.unit} {step}: non-finite {', '.join(bad)}; update skipped "
            f"({self.skipped} skipped so far, {self.in_a_row} in a row)",
            file=sys.stderr,
            flush=True,
        )
        if self.in_a_row >= self.max_in_a_row:
            raise UserFacingError(
                f"{self.in_a_row} steps in a row had a non-finite {' / '.join(bad)} (last at {self.unit} {step}; "
                f"{self.field}={self.max_in_a_row}); the run is diverging. Lower the learning rate, check the "
                "data, or resume from the last checkpoint with a smaller lr."
            )
        return False

    def metrics(self) -> dict[str, int]:
        """``{"nonfinite_skipped": n}`` once a step was skipped (nothing before, to keep clean logs clean)."""
        return {"nonfinite_skipped": self.skipped} if self.skipped else {}

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Mapping[str, int] | None) -> None:
        """Restore the counters (None, from a checkpoint written before the guard existed, means zero)."""
        state = state or {}
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors holding NaN/inf anywhere in a nested dict/list of tensors."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if isinstance(state, torch.Tensor):
        return [prefix or "tensor"] if state.is_floating_point() and not is_finite(state.detach()) else []
    found: list[str] = []
    if isinstance(state, Mapping):
        for key, value in state.items():
            found += nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            found += nonfinite_tensors(value, f"{prefix}[{i}]")
    return found


def require_finite_weights(state: Any, what: str) -> None:
    """Raise instead of saving ``what`` (a module or nested state) when any tensor in it is NaN/inf.

    A saved NaN model would poison every later stage and every resume; refusing keeps the last good one.
    """
    bad = nonfinite_tensors(state)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserFacingError(
            f"not saving {what}: NaN/inf values in {shown}. The previous checkpoint (if any) is kept; lower the "
            "learning rate and resume from it."
        )


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, _OOM_ERRORS):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MESSAGES)


def is_disk_full(error: BaseException) -> bool:
    """A full disk or an exhausted quota (torch's writers wrap the OSError in a RuntimeError)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, RuntimeError) and "no space left on device" in str(error).lower()


@contextlib.contextmanager
def out_of_memory_advice(phase: str, *fields: str) -> Iterator[None]:
    """Re-raise an out-of-memory error inside the block as a UserFacingError naming ``fields`` to lower."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserFacingError(
            f"out of memory during {phase} ({first_line[:200]}); lower {', '.join(fields)} and run the same "
            "command again (add --force-resume to continue from the last checkpoint with the changed setting)"
        ) from e
