"""Metrics files (append-only JSONL, truncated on resume, mirrored to experiment trackers) and JSON lines."""

from __future__ import annotations

import json

from accelerate.tracking import GeneralTracker

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


class RecordingTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is given."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logged, self.finished = [], 0

    @property
    def tracker(self):
        return self

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))

    def finish(self):
        self.finished += 1


def test_trackers_get_each_steps_numbers_and_are_finished_once_on_close(tmp_path):
    tracker = RecordingTracker()
    with MetricsWriter(tmp_path / "metrics.jsonl", [tracker]) as writer:
        writer.log(1, loss=0.5, note="text stays in the JSONL file", skipped=2)
    writer.close()
    assert tracker.logged == [(1, {"loss": 0.5, "skipped": 2})] and tracker.finished == 1
    assert _steps(tmp_path / "metrics.jsonl") == [1]


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
