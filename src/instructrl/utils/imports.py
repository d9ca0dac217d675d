"""Importing a user's code named by a spec: ``"package.module:name"`` or ``"path/to/file.py:name"``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from instructrl.errors import UserFacingError


def import_callable(module_part: str, attr: str, label: str, error: type[Exception] = UserFacingError) -> Callable:
    """The callable ``attr`` of ``module_part`` (a module name, or a ``.py`` file imported under its stem).

    Problems raise ``error`` with a message that starts with ``label`` (e.g. ``"judge 'j.py:f'"``)."""
    try:
        if module_part.endswith(".py"):
            path = Path(module_part)
            if not path.is_file():
                raise error(f"{label}: no such file {module_part}")
            module_spec = importlib.util.spec_from_file_location(f"instructrl_user_{path.stem}", path)
            if module_spec is None or module_spec.loader is None:
                raise error(f"{label}: cannot import {module_part}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # dataclasses and pickling look the module up by name
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
    except ImportError as e:
        raise error(f"{label}: cannot import {module_part} ({e})") from None
    found = getattr(module, attr, None)
    if not callable(found):
        raise error(f"{label}: {module_part} has no callable {attr!r}")
    return found
