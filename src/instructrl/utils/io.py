"""Crash-safe file writing: a reader never sees a half-written file, and a failed write keeps the old one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from instructrl.utils.kill_hook import kill_point
from instructrl.utils.trackers import finish_trackers, log_to_trackers

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(
    path: str | Path, mode: str = "w", encoding: str | None = "utf-8", private: bool = False
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    On any exception (including a full disk) the temporary file is removed and ``path`` is untouched.
    ``private`` files are readable by their owner only (mode 0600), others get the permissions open() gives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if not private:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        kill_point("write", None, path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str, private: bool = False) -> None:
    with atomic_open(path, "w", private=private) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any, private: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n", private)


_LINE_BREAKS_IN_STRINGS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl_line(record: Any) -> str:
    """One JSON line (UTF-8 text kept as is) ending in a newline.

    Characters that ``str.splitlines`` and some JSON-lines readers take for line breaks (NEL U+0085, the
    Unicode line and paragraph separators) are written as ``\\u`` escapes: JSON leaves them raw inside
    strings, and a reader that splits on them would cut a record in two. They can only occur inside strings,
    so the escape changes nothing else; the other line-breaking characters are control characters that
    ``json.dumps`` escapes already.
    """
    return json.dumps(record, ensure_ascii=False, default=_json_default).translate(_LINE_BREAKS_IN_STRINGS) + "\n"


def atomic_write_jsonl(path: str | Path, records: Iterable[dict[str, Any]], private: bool = False) -> int:
    """Write records as JSON lines atomically (``private``: see :func:`atomic_open`); returns how many."""
    n = 0
    with atomic_open(path, "w", private=private) as f:
        for rec in records:
            f.write(jsonl_line(rec))
            n += 1
    return n


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


class MetricsWriter:
    """Append-only JSONL metrics file (one object per step), mirrored to experiment trackers when given some.

    Each record is flushed as written so that a crash loses at most the line being written; on resume
    the writer drops records past the resumed step so the file never holds a step twice. ``trackers``
    (accelerate trackers from :func:`~instructrl.utils.trackers.start_trackers`) receive every step's numbers
    and are finished by :meth:`close`.
    """

    def __init__(self, path: str | Path, trackers: Sequence[Any] = (), resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl_lenient(self.path) if r.get("step", -1) <= resume_step]
            atomic_write_jsonl(self.path, kept)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.trackers = list(trackers)

    def log(self, step: int, **metrics: Any) -> None:
        record = {"step": step, **metrics}
        self._f.write(json.dumps(record, default=_json_default) + "\n")
        self._f.flush()
        kill_point("log", step, self.path)
        log_to_trackers(self.trackers, step, metrics)

    def close(self) -> None:
        self._f.close()
        trackers, self.trackers = self.trackers, []  # finished once, even if close() is called again
        finish_trackers(trackers)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl_lenient(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by this project, ignoring a torn last line (from a crash)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out
