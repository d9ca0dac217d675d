"""Metrics files (append-only JSONL, truncated on resume, optionally mirrored to TensorBoard) and JSON lines."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest

from instructrl.utils.io import MetricsWriter, atomic_write_jsonl, jsonl_line


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_records_past_the_resumed_step_and_a_fresh_run_starts_over(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    for step in range(1, 6):
        writer.log(step, loss=1.0 / step)
    writer.close()
    resumed = MetricsWriter(path, resume_step=3)
    resumed.log(4, loss=0.2)
    resumed.close()
    assert _steps(path) == [1, 2, 3, 4]
    MetricsWriter(path).close()
    assert not path.exists() or path.read_text() == ""


def test_tensorboard_mirror_writes_events_or_warns_that_it_cannot(tmp_path):
    board = tmp_path / "tensorboard"
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.warns(UserWarning, match="tensorboard package is not installed"):
            writer = MetricsWriter(tmp_path / "metrics.jsonl", board)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            writer = MetricsWriter(tmp_path / "metrics.jsonl", board)
    writer.log(1, loss=0.5, note="text is skipped by tensorboard")
    writer.close()
    assert _steps(tmp_path / "metrics.jsonl") == [1]
    if importlib.util.find_spec("tensorboard") is not None:
        assert any(p.name.startswith("events.out.tfevents") for p in board.iterdir())


def test_json_lines_escape_the_characters_that_splitlines_breaks_on(tmp_path):
    """NEL and the Unicode line/paragraph separators stay inside their record (hypothesis found a prompt with
    U+0085 split in two by ``str.splitlines``); the text round-trips and other non-ASCII stays readable."""
    records = [{"prompt": "a\x85b\u2028c\u2029d", "response": "é ü 日本\x0b\x0c\x1c"}, {"prompt": "next"}]
    path = tmp_path / "out.jsonl"
    assert atomic_write_jsonl(path, records) == 2
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2 and "é ü 日本" in text
    assert [json.loads(line) for line in text.splitlines()] == records
    assert jsonl_line(records[0]) == text.splitlines(keepends=True)[0]
