"""Test hook: make the process SIGKILL itself at a named point, to test that every stage resumes exactly.

Kill tests need interruptions at precise, reproducible places (between two steps, halfway through writing a
checkpoint, just before the final results are renamed into place); timers would make them flaky. Set

    INSTRUCTRL_TEST_KILL_AT=PHASE:STEP[:WHERE]

and the process kills itself with SIGKILL (no cleanup, no ``finally``, exactly like a preemption or the OOM
killer) the first time :func:`kill_point` is reached with that ``PHASE``, that ``STEP`` (``*`` = any) and a
location containing ``WHERE``. The phases:

* ``log``: right after a metrics line for ``STEP`` is flushed (``WHERE`` matches the metrics file path);
* ``checkpoint-write``: a checkpoint's state file is written and fsynced, but not yet renamed into place;
* ``checkpoint-done``: a checkpoint is complete; older ones are not yet pruned (``WHERE``: the run dir);
* ``write``: an atomically written file is complete but not yet renamed over its final name
  (``STEP`` is ignored; ``WHERE`` matches the final path, e.g. ``results.json``).

Unset (always, outside tests), :func:`kill_point` only reads one environment variable.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_AT_ENV = "INSTRUCTRL_TEST_KILL_AT"
PHASES = ("log", "checkpoint-write", "checkpoint-done", "write")


def parse_kill_spec(spec: str) -> tuple[str, int | None, str]:
    """``"log:3:sft"`` -> ``("log", 3, "sft")``; a step of ``*`` gives None (any step)."""
    phase, _, rest = spec.partition(":")
    step, _, where = rest.partition(":")
    if phase not in PHASES:
        raise ValueError(f"{KILL_AT_ENV}: unknown phase {phase!r}; expected one of {PHASES}")
    return phase, None if step in ("", "*") else int(step), where


def kill_point(phase: str, step: int | None, where: str | Path = "") -> None:
    """SIGKILL this process if ``INSTRUCTRL_TEST_KILL_AT`` names this point (see the module docstring)."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    want_phase, want_step, want_where = parse_kill_spec(spec)
    if phase == want_phase and (want_step is None or want_step == step) and want_where in str(where):
        os.kill(os.getpid(), signal.SIGKILL)
