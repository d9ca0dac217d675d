"""Fuzzing every loader and ``data prepare`` with malformed input (hypothesis).

Inputs: arbitrary bytes, invalid UTF-8, lone UTF-16 surrogates (escaped or raw), odd Unicode (NUL, BOMs,
line and paragraph separators, right-to-left marks), JSON that nests too deep or holds integers over
Python's digit limit, fields of the wrong type, empty and huge fields, and near-valid records of every format.

Properties: a loader returns records or raises :class:`DataError` naming the file and line; with
``skip_bad`` it never raises for a bad record and counts every line it read; every loaded string can be
written back as UTF-8. ``instructrl data prepare`` exits 0 with every output written and readable, or
exits 1 with a one-line error and every earlier output byte-for-byte as it was; it never leaves a
temporary file and never shows a traceback.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructrl.cli import main
from instructrl.data import load_comparisons, load_demonstrations, load_prompts, load_texts
from instructrl.data.prepare import OUTPUT_FILES
from instructrl.errors import DataError

LOADERS = {
    "demonstration": load_demonstrations,
    "comparison": load_comparisons,
    "prompt": load_prompts,
    "text": load_texts,
}
FIELD_NAMES = ("prompt", "response", "messages", "responses", "ranking", "chosen", "rejected", "text", "user_id",
               "role", "content", "labeler_id")  # fmt: skip
ODD_CHARACTERS = "\x00\ufeff\u2028\u2029\u200f\u202e\x85\r\t\ud800\udfff\U0001f600é"

# Text from every Unicode category, lone surrogates included, with a bias toward the odd characters above.
texts = st.text(
    alphabet=st.one_of(st.characters(exclude_categories=()), st.sampled_from(ODD_CHARACTERS)), max_size=12
) | st.sampled_from(["", " ", "\n\nHuman: hi\n\nAssistant: yo", "x" * 100_000, "Q: a\nA: b\nQ: c\nA:"])
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES) | texts, inner, max_size=4)
    ),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]) | json_scalars,
                           "content": texts | json_scalars}),
    max_size=3,
)  # fmt: skip
rankings = st.lists(st.integers(-1, 4) | st.lists(st.integers(0, 4), max_size=3) | json_scalars, max_size=5)
near_valid_records = st.one_of(
    st.fixed_dictionaries({"prompt": texts, "response": texts}),
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"prompt": texts, "responses": st.lists(texts, max_size=5), "ranking": rankings}),
    st.fixed_dictionaries({"prompt": texts, "chosen": texts, "rejected": texts}),
    st.fixed_dictionaries({"chosen": texts, "rejected": texts}),
    st.fixed_dictionaries({"prompt": texts}, optional={"user_id": json_scalars, "labeler_id": json_values}),
    st.fixed_dictionaries({"text": texts}),
)
records = near_valid_records | st.dictionaries(st.sampled_from(FIELD_NAMES) | texts, json_values, max_size=5)


def encode_record(record: dict, ascii_only: bool) -> bytes:
    """JSON for one record; ``ascii_only=False`` writes lone surrogates as raw (invalid UTF-8) bytes."""
    return json.dumps(record, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


special_lines = st.sampled_from(
    [
        b"",
        b"   ",
        b"[" * 50_000,
        b'{"prompt": ' + b"9" * 5000 + b"}",
        b'{"prompt": "a\\ud800b"}',
        b'{"prompt": "\\ud83d\\ude00 fine"}',
        b'{"text": NaN, "prompt": Infinity}',
        b"\xef\xbb\xbf" + b'{"prompt": "bom", "text": "bom"}',
        b'{"prompt": "x"',
        b"\xff\xfe\x00",
        b"null",
        b'["prompt"]',
    ]
)
lines = st.one_of(
    st.builds(encode_record, records, st.booleans()),
    st.binary(max_size=40),
    special_lines,
)


def write_input(directory: Path, body: list[bytes], gz: bool) -> Path:
    data = b"\n".join(body) + b"\n"
    path = directory / ("input.jsonl.gz" if gz else "input.jsonl")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def assert_writable_as_utf8(record) -> None:
    json.dumps(dataclasses.asdict(record), ensure_ascii=False, default=str).encode("utf-8")


@pytest.mark.parametrize("kind", sorted(LOADERS))
@settings(max_examples=60, deadline=None)
@given(body=st.lists(lines, max_size=6), gz=st.booleans())
def test_loaders_give_records_or_a_clear_error_and_skip_bad_counts_every_line(kind, body, gz):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_input(Path(tmp), body, gz)
        try:
            loaded, _ = LOADERS[kind](path)
        except DataError as e:
            assert str(e).startswith(f"{path}:{e.line}: ") and e.line is not None
        else:
            for record in loaded:
                assert_writable_as_utf8(record)
        loaded, stats = LOADERS[kind](path, skip_bad=True)
        assert stats.n_ok == len(loaded)
        n_lines = len((b"\n".join(body) + b"\n").split(b"\n")) - 1
        assert stats.n_ok + stats.n_skipped <= n_lines
        assert sum(stats.reasons.values()) == stats.n_skipped
        for record in loaded:
            assert_writable_as_utf8(record)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.lists(lines, max_size=6), skip_bad=st.booleans())
def test_data_prepare_writes_every_output_or_leaves_the_previous_ones(capsys, body, skip_bad):
    with tempfile.TemporaryDirectory() as tmp:
        source = write_input(Path(tmp), body, gz=False)
        out = Path(tmp) / "prepared"
        out.mkdir()
        previous = {name: f"previous {name}\n" for name in OUTPUT_FILES}
        for name, text in previous.items():
            (out / name).write_text(text)
        capsys.readouterr()
        code = main(["data", "prepare", "--set", f"input={source}", "--set", f"output_dir={out}",
                     "--set", f"skip_bad={str(skip_bad).lower()}"])  # fmt: skip
        err = capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)  # no temporary file left behind
        assert "Traceback" not in err
        if code == 1:
            assert not skip_bad and "error:" in err and str(source) in err
            assert {name: (out / name).read_text() for name in OUTPUT_FILES} == previous
            return
        assert code == 0
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        kept = 0
        for split in ("train", "valid", "test"):
            rows = (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            kept += sum(1 for row in rows if json.loads(row)["prompt"])
        assert kept == report["prompts_kept"]
