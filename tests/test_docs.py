"""``docs/ppo-details.md`` against the code: citations resolve, named files, symbols and tests exist.

Code cites an implementation detail as ``[ppo-details: name]`` (several names comma-separated); the table in
``docs/ppo-details.md`` has one row per name, with the files that implement it and the tests that check it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DETAILS = ROOT / "docs" / "ppo-details.md"
SRC = ROOT / "src"

CITATION = re.compile(r"\[ppo-details:\s*([^\]]*)\]")
"""``[ppo-details: a, b]``; the names may wrap onto the next docstring line."""
NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
"""A stable name: lower-case kebab-case."""
OLD_CITATION = re.compile(r"\bN\+?(?:\s+details?)?\s+\d+\b|\bN\+? details?\b")
"""Citations by number ("N detail 18", "N+ 25", "N+ details"), which the stable names replace."""
REFERENCE = re.compile(r"`((?:src|tests)/[^`:\s]+)(?:::([A-Za-z_][A-Za-z0-9_]*))?`")
"""A backticked ``path`` or ``path::name`` in a table cell."""


def table_rows(text: str) -> dict[str, list[str]]:
    """Stable name -> the row's cells (name, what, source, implemented in, tested by), from the details table."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) != 5:
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"{name} has two rows"
        rows[name] = cells
    return rows


def citations(text: str) -> list[str]:
    """Every name cited in ``text``, in order, repeats kept."""
    return [n.strip() for m in CITATION.finditer(text) for n in m.group(1).split(",")]


def unknown_citations(sources: dict[str, str], names: set[str]) -> list[str]:
    """``path: name`` for every cited name that is not a row of the table."""
    return [f"{path}: {name!r}" for path, text in sources.items() for name in citations(text) if name not in names]


def defines(text: str, symbol: str) -> bool:
    """Whether a Python source defines ``symbol``: a def, a class, or an assignment / annotated field."""
    return (
        re.search(rf"^\s*(?:(?:async\s+)?def|class)\s+{symbol}\b|^\s*{symbol}\s*[:=]", text, re.MULTILINE) is not None
    )


def missing_references(rows: dict[str, list[str]], root: Path) -> list[str]:
    """Every file, symbol or test named in the table's last two columns that does not exist under ``root``."""
    missing = []
    for name, cells in rows.items():
        for path, symbol in REFERENCE.findall(cells[3] + " " + cells[4]):
            file = root / path
            if not file.is_file():
                missing.append(f"{name}: {path} does not exist")
            elif symbol and not defines(file.read_text(encoding="utf-8"), symbol):
                missing.append(f"{name}: {path} defines no {symbol}")
    return missing


def python_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(SRC.rglob("*.py"))}


@pytest.fixture(scope="module")
def rows() -> dict[str, list[str]]:
    return table_rows(DETAILS.read_text(encoding="utf-8"))


def test_every_row_has_a_kebab_case_name_a_source_and_a_file(rows):
    assert len(rows) >= 20, f"the details table has {len(rows)} rows: is docs/ppo-details.md parsed?"
    for name, (_, what, source, implemented, tested) in rows.items():
        assert NAME.fullmatch(name), f"{name!r} is not kebab-case"
        assert what and source, f"{name}: empty description or source"
        assert REFERENCE.search(implemented), f"{name}: names no implementing file"
        assert REFERENCE.search(tested) or tested == "None yet", f"{name}: tested-by is neither tests nor 'None yet'"


def test_every_citation_in_src_names_a_row(rows):
    sources = python_sources()
    assert sum(len(citations(text)) for text in sources.values()) >= 20, "too few [ppo-details: ...] citations"
    assert unknown_citations(sources, set(rows)) == []


def test_an_unknown_or_misspelt_citation_is_reported(rows):
    text = (
        'x = 1  # [ppo-details: eos-trick, eos_trick]\n"""wrapped [ppo-details: reward-at-eos,\n    no-such-detail]"""'
    )
    assert citations(text) == ["eos-trick", "eos_trick", "reward-at-eos", "no-such-detail"]
    assert unknown_citations({"a.py": text}, set(rows)) == ["a.py: 'eos_trick'", "a.py: 'no-such-detail'"]


def test_every_file_symbol_and_test_the_table_names_exists(rows):
    assert missing_references(rows, ROOT) == []


def test_a_missing_file_symbol_or_test_is_reported(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("class Kept:\n    field: int = 0\n\ndef used():\n    pass\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_one():\n    pass\n")
    table = (
        "| `d` | what | N 1 | `src/a.py::Kept`, `src/a.py::field`, `src/a.py::used`, `src/b.py` "
        "| `tests/test_a.py::test_one`, `tests/test_a.py::test_two` |"
    )
    assert missing_references(table_rows(table), tmp_path) == [
        "d: src/b.py does not exist",
        "d: tests/test_a.py defines no test_two",
    ]


def test_no_citation_by_number_remains_in_src():
    old = [
        f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for path, text in python_sources().items()
        for m in OLD_CITATION.finditer(text)
    ]
    assert old == []


def test_every_row_is_cited_somewhere_in_src(rows):
    cited = {name for text in python_sources().values() for name in citations(text)}
    assert sorted(set(rows) - cited) == []
