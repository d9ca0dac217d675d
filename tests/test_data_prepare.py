"""Tests for ``instructrl data prepare``: PII scrubbing, dedup, per-user cap, user splits, tagging, outputs."""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructrl.cli import main
from instructrl.config import ConfigError, load_config
from instructrl.data import pii, prepare
from instructrl.data.prepare import Config
from instructrl.data.records import PromptRecord
from instructrl.errors import DataError

# --------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    """Write rows (dicts as JSON, strings verbatim) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_config(tmp: Path, **changes) -> Config:
    """A config for in-memory use (``input`` must exist for validation; nothing reads it here)."""
    placeholder = tmp / "unused.jsonl"
    placeholder.touch()
    return Config(input=str(placeholder), output_dir=str(tmp / "out"), **changes)


def kinds_found(text: str) -> list[str]:
    return [kind for kind, _ in pii.find_pii(text)]


def dir_snapshot(directory: Path) -> dict[str, tuple[bytes, int] | None]:
    """Path -> (bytes, mtime_ns) of every file under ``directory``, None for folders (hidden ones included)."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(directory.rglob("*"))
    }


# --------------------------------------------------------------------------- PII: unit tests


@pytest.mark.parametrize(
    "text, matched",
    [
        ("write to john.doe+news@mail.example.co.uk today", "john.doe+news@mail.example.co.uk"),
        ("Contact: A_B-9@x-y.io.", "A_B-9@x-y.io"),
        ("4111111111111111@bank.com", "4111111111111111@bank.com"),  # digits inside an e-mail: one EMAIL
    ],
)
def test_email_found(text, matched):
    assert [(kind, text[s:e]) for kind, (s, e) in pii.find_pii(text)] == [("EMAIL", matched)]


@pytest.mark.parametrize("text", ["twitter @handle", "a@b", "user@localhost", "x@y.c", "price 5@3 each"])
def test_email_not_found(text):
    assert "EMAIL" not in kinds_found(text)


@pytest.mark.parametrize(
    "phone",
    [
        "+1 415 555 2671",
        "+14155552671",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "+49-30-1234567",
        "+33 1 23 45 67 89",
        "(415) 555-2671",
        "415-555-2671",
        "415.555.2671",
        "1-800-555-0199",
        "020 7946 0958",
        "07700 900123",
        "01 23 45 67 89",
    ],
)
def test_phone_found(phone):
    text = f"call me at {phone} after lunch"
    assert [(kind, text[s:e]) for kind, (s, e) in pii.find_pii(text)] == [("PHONE", phone)]


@pytest.mark.parametrize(
    "text",
    [
        "in 2023 we sold 15 items for $40",
        "revenue was $1,299.99 in 1999-2003",
        "the meeting is on 2023-05-17 or 01-02-2023",
        "order number 4155552671",  # unformatted 10 digits: ambiguous, left alone
        "555-2671",  # 7-digit local number without area code
        "+5 - 3 = 2 and +100 points",
        "(123) 456-7890",  # NANP area codes never start with 0 or 1
        "pi is 3.14159265358979 and e is 2.718281828",
        "ISBN 978-0-306-40615-7",
    ],
)
def test_ordinary_numbers_are_not_pii(text):
    assert pii.find_pii(text) == []
    assert pii.scrub(text) == (text, collections.Counter())


@pytest.mark.parametrize(
    "card",
    ["4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111", "378282246310005", "6011000990139424"],
)
def test_card_found(card):
    text = f"my card is {card}, expires soon"
    assert [(kind, text[s:e]) for kind, (s, e) in pii.find_pii(text)] == [("CARD", card)]


def test_card_found_inside_longer_digit_run():
    text = "card 4111 1111 1111 1111 2023 thanks"
    assert [(k, text[s:e]) for k, (s, e) in pii.find_pii(text)] == [("CARD", "4111 1111 1111 1111")]


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # fails the Luhn check
        "1234 5678 9012 3456",  # fails the Luhn check
        "411111111111",  # 12 digits: too short for a card
        "41111111111111111111",  # 20 digits: too long
        "1 000 000 000 000",  # a big number in blocks of three
        "1000 0000 0000 0000 0000",  # 20 digits in blocks of four
        "4111 1111 1111-1111",  # mixed separators
        "sha 4111111111111111abc",  # part of a longer token
    ],
)
def test_card_not_found(text):
    assert "CARD" not in kinds_found(text)


def test_luhn_known_values():
    assert pii.luhn_valid("79927398713")  # the textbook example
    assert not pii.luhn_valid("79927398710")
    assert pii.luhn_valid("4111111111111111")


@pytest.mark.parametrize(
    "ip",
    [
        "192.168.0.1",
        "8.8.8.8",
        "255.255.255.255",
        "2001:db8::1",
        "fe80::1ff:fe23:4567:890a",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "::ffff:192.0.2.128",
        "dead:beef:cafe:babe:dead:beef:cafe:babe",
    ],
)
def test_ip_found(ip):
    text = f"server at {ip}. Please check"
    assert [(kind, text[s:e]) for kind, (s, e) in pii.find_pii(text)] == [("IP", ip)]


@pytest.mark.parametrize(
    "text",
    [
        "upgrade to v1.2.3 or Python 3.10.4",
        "version 1.2.3.4.5 is out",
        "10.0.0.256 is not an address",
        "the race ended at 12:30:45",
        "MAC 00:1A:2B:3C:4D:5E",
        "use a[::2] and std::vector",
        "localhost is ::1",  # compressed forms need two groups (see pii.py)
    ],
)
def test_ip_not_found(text):
    assert "IP" not in kinds_found(text)


def test_scrub_replaces_and_counts():
    text = "Mail a@b.com or c@d.org, call +1 415 555 2671, card 4111 1111 1111 1111, host 10.0.0.1 in 2023."
    scrubbed, counts = pii.scrub(text)
    assert scrubbed == "Mail [EMAIL] or [EMAIL], call [PHONE], card [CARD], host [IP] in 2023."
    assert counts == collections.Counter({"EMAIL": 2, "PHONE": 1, "CARD": 1, "IP": 1})


def test_find_pii_spans_are_sorted_and_disjoint():
    text = "x@y.com 10.0.0.1 +1 415 555 2671 4111111111111111 fe80::1:2"
    spans = [span for _, span in pii.find_pii(text)]
    assert len(spans) == 5
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_find_pii_is_fast_on_long_adversarial_text():
    import time

    text = ("1" * 5000 + " ") + ("a:" * 3000) + ("+1" + "2" * 3000) + ("x" * 5000 + "@") + ("1." * 3000)
    start = time.perf_counter()
    pii.scrub(text)
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------- PII: property tests

_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8)


@st.composite
def emails(draw) -> str:
    local = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=12))
    local = "u" + local.strip(".")  # a letter first, no dot at the end
    domain = draw(
        st.lists(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8), min_size=1, max_size=3
        )
    )
    tld = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=6))
    return f"{local}@{'.'.join(domain)}.{tld}"


@st.composite
def phones(draw) -> str:
    d = [str(draw(st.integers(2, 9)))] + [str(draw(st.integers(0, 9))) for _ in range(9)]
    area, exchange, line = "".join(d[:3]), str(draw(st.integers(2, 9))) + "".join(d[4:6]), "".join(d[6:10])
    country = draw(st.integers(1, 99))
    styles = {
        "intl": f"+{country} {area} {exchange} {line}",
        "paren": f"({area}) {exchange}-{line}",
        "dash": f"{area}-{exchange}-{line}",
        "dot": f"{area}.{exchange}.{line}",
        "trunk": f"0{area[:2]} {exchange}{line[0]} {line[1:]}",
    }
    return styles[draw(st.sampled_from(list(styles)))]


def _luhn_complete(body: str) -> str:
    """Append the check digit that makes ``body`` Luhn-valid."""
    return body + next(str(c) for c in range(10) if pii.luhn_valid(body + str(c)))


@st.composite
def cards(draw) -> str:
    n = draw(st.integers(13, 19))
    body = str(draw(st.integers(1, 9))) + "".join(str(draw(st.integers(0, 9))) for _ in range(n - 2))
    digits = _luhn_complete(body)
    separator = draw(st.sampled_from(["", " ", "-"]))
    return separator.join(digits[i : i + 4] for i in range(0, len(digits), 4))


def _compressed_ipv6_is_matched(address: str) -> bool:
    # Documented limit of pii.py: "::"-compressed forms need a digit and two groups (so "a[::2]" stays).
    return "::" not in address or (
        any(c.isdigit() for c in address) and len([g for g in address.split(":") if g]) >= 2
    )


ipv4s = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6s = st.builds(
    lambda n, full: ipaddress.IPv6Address(n).exploded if full else ipaddress.IPv6Address(n).compressed,
    st.integers(0, 2**128 - 1),
    st.booleans(),
).filter(_compressed_ipv6_is_matched)
PII_VALUES = st.one_of(
    st.tuples(st.just("EMAIL"), emails()),
    st.tuples(st.just("PHONE"), phones()),
    st.tuples(st.just("CARD"), cards()),
    st.tuples(st.just("IP"), ipv4s),
    st.tuples(st.just("IP"), ipv6s),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_WORD.map(lambda w: ("TEXT", w)), PII_VALUES), min_size=1, max_size=12))
def test_property_injected_pii_is_replaced_by_its_placeholder(pieces):
    # Pieces are joined by ", " as in a list; directly abutting numbers ("<card> <phone>") can merge.
    text = ", ".join(value for _, value in pieces)
    scrubbed, counts = pii.scrub(text)
    assert pii.find_pii(scrubbed) == []
    injected = collections.Counter(kind for kind, _ in pieces if kind != "TEXT")
    assert counts == injected
    for kind, n in injected.items():
        assert scrubbed.count(pii.placeholder(kind)) == n
    # The ordinary words survive in order: the scrubbed text is the words with placeholders between them.
    expected = ", ".join(value if kind == "TEXT" else pii.placeholder(kind) for kind, value in pieces)
    assert scrubbed == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), PII_VALUES.map(lambda kv: kv[1])), max_size=10))
def test_property_scrubbed_text_has_no_pii_left(pieces):
    # Arbitrary text glued to PII without separators: whatever is matched, nothing matchable remains.
    scrubbed, counts = pii.scrub("".join(pieces))
    assert pii.find_pii(scrubbed) == []
    assert pii.scrub(scrubbed) == (scrubbed, collections.Counter())  # idempotent
    for kind in counts:
        assert pii.placeholder(kind) in scrubbed


# --------------------------------------------------------------------------- dedup, cap, split


def records_of(*prompts: str, user: str | None = "u") -> list[PromptRecord]:
    return [PromptRecord(p, user, {"i": i}) for i, p in enumerate(prompts)]


def test_exact_duplicates_ignore_case_and_whitespace_and_keep_the_first():
    recs = records_of("Hello  World", "hello world", "HELLO\tworld\n", "something else")
    kept, removed = prepare.remove_exact_duplicates(recs)
    assert [r.meta["i"] for r in kept] == [0, 3]
    assert removed == 2


def test_prefix_duplicates_share_the_first_n_normalized_characters():
    template = "Please summarize the following customer support ticket for the on-call team:"
    recs = records_of(template + " printer on fire", "Short prompt", template + " the VPN is down", "Short prompt!")
    kept, removed = prepare.remove_prefix_duplicates(recs, 64)
    assert [r.meta["i"] for r in kept] == [0, 1, 3]  # prompts shorter than 64 characters never match here
    assert removed == 1
    assert prepare.remove_prefix_duplicates(recs, 0) == (recs, 0)
    # With a prefix longer than the shared template, the two ticket prompts differ.
    assert prepare.remove_prefix_duplicates(recs, len(template) + 5)[1] == 0


def test_cap_per_user_keeps_a_seeded_subset_in_input_order():
    recs = [PromptRecord(f"p{i}", "heavy", {"i": i}) for i in range(50)] + records_of("a", "b", user="light")
    kept, removed, n_capped = prepare.cap_per_user(recs, 10, seed=3)
    heavy = [r.meta["i"] for r in kept if r.user_id == "heavy"]
    assert len(heavy) == 10 and heavy == sorted(heavy)
    assert [r.prompt for r in kept if r.user_id == "light"] == ["a", "b"]
    assert (removed, n_capped) == (40, 1)
    assert prepare.cap_per_user(recs, 10, seed=3) == (kept, removed, n_capped)
    subsets = {tuple(r.meta["i"] for r in prepare.cap_per_user(recs, 10, seed=s)[0]) for s in range(5)}
    assert len(subsets) > 1  # the seed matters


def test_split_by_user_approaches_the_target_fractions():
    sizes = {f"user{i}": 1 + (i * 7) % 13 for i in range(300)}
    recs = [PromptRecord(f"{u}-{k}", u) for u, n in sizes.items() for k in range(n)]
    fractions = {"train": 0.7, "valid": 0.2, "test": 0.1}
    splits = prepare.split_by_user(recs, fractions, seed=0)
    n = len(recs)
    for name, f in fractions.items():
        assert abs(len(splits[name]) / n - f) <= max(sizes.values()) / n


def test_split_with_zero_fraction_is_empty():
    recs = [PromptRecord(f"p{i}", f"user{i % 17}") for i in range(100)]
    splits = prepare.split_by_user(recs, {"train": 0.9, "valid": 0.0, "test": 0.1}, seed=1)
    assert splits["valid"] == []
    assert len(splits["train"]) + len(splits["test"]) == 100


def test_anonymous_prompts_each_get_their_own_stable_user():
    recs = [PromptRecord("first prompt"), PromptRecord("second prompt", ""), PromptRecord("third", "alice")]
    out, n_anonymous = prepare.assign_anonymous_users(recs)
    assert n_anonymous == 2
    assert out[0].user_id == prepare.anonymous_user_id("First   PROMPT")
    assert out[0].user_id.startswith("anon-") and out[0].user_id != out[1].user_id
    assert out[2].user_id == "alice"


user_prompt_sets = st.lists(
    st.tuples(
        st.one_of(st.none(), st.sampled_from([f"user{i}" for i in range(12)])),
        st.text(alphabet="abc ABC\n", min_size=1, max_size=12).filter(str.strip),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=user_prompt_sets,
    seed=st.integers(0, 2**31),
    cap=st.integers(1, 6),
    prefix=st.integers(0, 8),
    fractions=st.tuples(st.floats(0, 0.45), st.floats(0, 0.45)),
)
def test_property_no_user_in_two_splits_and_every_kept_prompt_once(tmp_path, rows, seed, cap, prefix, fractions):
    records = [PromptRecord(prompt, user, {"row": i}) for i, (user, prompt) in enumerate(rows)]
    cfg = make_config(
        tmp_path,
        seed=seed,
        max_prompts_per_user=cap,
        dedup_prefix_chars=prefix,
        valid_fraction=fractions[0],
        test_fraction=fractions[1],
    )
    prepared = prepare.prepare_prompts(records, cfg)
    users_of = {s: {r.user_id for r in prepared.splits[s]} for s in prepare.SPLITS}
    assert not users_of["train"] & users_of["valid"]
    assert not users_of["train"] & users_of["test"]
    assert not users_of["valid"] & users_of["test"]

    kept_rows = [r.meta["row"] for s in prepare.SPLITS for r in prepared.splits[s]]
    assert len(kept_rows) == len(set(kept_rows)) == prepared.report["prompts_kept"]
    removed = prepared.report["removed"]
    assert (
        len(records)
        == len(kept_rows) + removed["exact_duplicates"] + removed["prefix_duplicates"] + removed["user_cap"]
    )
    # Each kept record is its input record, unchanged but for the filled-in user id.
    for s in prepare.SPLITS:
        for r in prepared.splits[s]:
            source = records[r.meta["row"]]
            assert r.prompt == source.prompt
            assert r.user_id == (source.user_id or prepare.anonymous_user_id(source.prompt))
    normalized = [prepare.normalize(r.prompt) for s in prepare.SPLITS for r in prepared.splits[s]]
    assert len(normalized) == len(set(normalized))
    per_user = collections.Counter(r.user_id for s in prepare.SPLITS for r in prepared.splits[s])
    assert all(n <= cap for n in per_user.values())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=user_prompt_sets, seed=st.integers(0, 2**31))
def test_property_same_input_and_seed_give_byte_identical_outputs(tmp_path, rows, seed):
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        work = Path(work)
        src = write_jsonl(work / "in.jsonl", [{"prompt": p, "user_id": u} for u, p in rows])
        outputs = []
        for name in ("a", "b"):
            report = prepare.run(Config(input=str(src), output_dir=str(work / name), seed=seed))
            assert report["output_dir"] == str(work / name)
            files = {p.name: p.read_bytes() for p in sorted((work / name).iterdir())}
            # The two runs differ only in the output_dir they were told to write to.
            outputs.append({k: v.replace(str(work / name).encode(), b"OUT") for k, v in files.items()})
        assert outputs[0] == outputs[1]
        assert sorted(outputs[0]) == sorted(prepare.OUTPUT_FILES)


def test_outputs_do_not_depend_on_the_python_hash_seed(tmp_path):
    rows = [{"prompt": f"prompt {i} from {i % 9}", "user_id": f"u{i % 9}"} for i in range(60)]
    rows += [{"prompt": f"anonymous prompt {i}"} for i in range(10)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"  # the same folder both times, so config.yaml and report.json can match too
    results = []
    for hash_seed in ("1", "2"):
        code = "from instructrl.cli import main; raise SystemExit(main())"
        args = ["data", "prepare", "--set", f"input={src}", "--set", f"output_dir={out}", "--set", "seed=5"]
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code, *args], check=True, env=env, capture_output=True)
        results.append({name: (out / name).read_bytes() for name in prepare.OUTPUT_FILES})
    assert results[0] == results[1]


# --------------------------------------------------------------------------- few-shot tagging


@pytest.mark.parametrize(
    "text",
    [
        "Q: What is 2+2?\nA: 4\nQ: What is 3+3?\nA:",
        "Q: What is 2+2? A: 4 Q: What is 3+3? A:",
        "Input: cat\nOutput: chat\n\nInput: dog\nOutput:",
        "Translate.\nEnglish: cheese\nFrench: fromage\nEnglish: sea otter\nFrench:",
        "Translate English to French:\nsea otter => loutre de mer\ncheese =>",
        "Example 1: The sky is blue. -> positive\nExample 2: I hate rain. -> negative\nNow: I like tea.",
    ],
)
def test_few_shot_prompts(text):
    assert prepare.prompt_type(text) == "few-shot"


@pytest.mark.parametrize(
    "text",
    [
        "Write a poem about cats.",
        "Q: What is the capital of France?\nA:",  # zero-shot: one open pair, no worked example
        "User: hi\nAssistant: hello\nUser: how are you?\nAssistant:",  # dialogue turns, not examples
        "def f(x) -> int:\n    return x\n\ndef g(y) -> str:\n    return y",  # code arrows
        "Note: be brief. Note: be kind.",
        "For example, 1 apple is enough. Example: none.",
    ],
)
def test_plain_prompts(text):
    assert prepare.prompt_type(text) == "plain"


# --------------------------------------------------------------------------- run, report, CLI


def test_report_counts(tmp_path, capsys):
    template = "Rewrite the following paragraph so that a ten year old child can understand it easily:"
    rows: list[dict | str] = [
        {"prompt": "Email me at jane@example.com or call 415-555-2671", "user_id": "u1", "category": "chat"},
        {"prompt": "email me at  JANE@example.com or call 415-555-2671", "user_id": "u2"},  # exact dup after scrub
        {"prompt": "Tell me a joke", "user_id": "u3"},
        {"prompt": "tell me a joke"},  # exact duplicate, anonymous
        {"prompt": template + " first", "user_id": "u4"},
        {"prompt": template + " second", "user_id": "u5"},  # shared-prefix duplicate
        "{not json",  # bad record, skipped
        {"prompt": "Q: 1+1?\nA: 2\nQ: 2+2?\nA:", "user_id": "u6"},
        {"prompt": "", "user_id": "u7"},  # bad record (empty prompt), skipped
    ]
    rows += [{"prompt": f"heavy user prompt {i} from host 10.0.0.{i}", "user_id": "heavy"} for i in range(7)]
    src = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = Config(input=str(src), output_dir=str(tmp_path / "out"), skip_bad=True, max_prompts_per_user=3)
    report = prepare.run(cfg)

    assert report["loaded"] == {"records": 14, "anonymous": 1}
    assert report["bad_records"]["skipped"] == 2
    assert report["bad_records"]["reasons"] == {"empty_field": 1, "invalid_json": 1}
    assert report["pii"]["by_kind"] == {"EMAIL": 2, "PHONE": 2, "CARD": 0, "IP": 7}
    assert report["pii"]["prompts_changed"] == 9
    assert report["removed"] == {"bad_records": 2, "exact_duplicates": 2, "prefix_duplicates": 1, "user_cap": 4}
    assert report["users_capped"] == 1
    assert report["prompts_kept"] == 14 - 2 - 1 - 4 == 7
    assert report["users_kept"] == 5  # u1, u3, u4, u6, heavy
    assert report["types"] == {"plain": 6, "few-shot": 1}
    assert sum(s["prompts"] for s in report["splits"].values()) == 7
    assert sum(s["users"] for s in report["splits"].values()) == 5
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report

    written = [r for split in prepare.SPLITS for r in read_jsonl(tmp_path / "out" / f"{split}.jsonl")]
    by_user = {r["user_id"]: r for r in written}
    assert by_user["u1"] == {
        "prompt": "Email me at [EMAIL] or call [PHONE]",
        "user_id": "u1",
        "type": "plain",
        "category": "chat",
    }
    assert by_user["u6"]["type"] == "few-shot"
    assert "prepared 7 prompts" in capsys.readouterr().out


def test_cli_data_prepare(tmp_path, capsys):
    rows = [
        {"prompt": f"How do I cook dish number {i}?", "user_id": f"user{i % 20}", "lang": "en"} for i in range(100)
    ]
    src = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "prepared"
    code = main(["data", "prepare", "--set", f"input={src}", "--set", f"output_dir={out}", "--set", "seed=7"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(prepare.OUTPUT_FILES)
    report = json.loads((out / "report.json").read_text())
    assert report["prompts_kept"] == 100 and report["seed"] == 7
    splits = {s: read_jsonl(out / f"{s}.jsonl") for s in prepare.SPLITS}
    assert sum(map(len, splits.values())) == 100
    assert all(set(r) == {"prompt", "user_id", "type", "lang"} for recs in splits.values() for r in recs)
    assert all(len(recs) > 0 for recs in splits.values())
    assert "train" in capsys.readouterr().out


def test_bad_record_raises_with_line_and_keeps_previous_outputs(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": f"prompt {i}", "user_id": f"u{i}"} for i in range(30)])
    out = tmp_path / "out"
    prepare.run(Config(input=str(good), output_dir=str(out)))
    (out / "notes.txt").write_text("kept by the user")
    before = dir_snapshot(out)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "user_id": "a"}, {"prompt": 42, "user_id": "b"}])
    with pytest.raises(DataError) as info:
        prepare.run(Config(input=str(bad), output_dir=str(out)))
    assert info.value.line == 2 and info.value.field == "prompt"
    assert f"{bad}:2" in str(info.value)
    assert dir_snapshot(out) == before

    code = main(["data", "prepare", "--set", f"input={bad}", "--set", f"output_dir={out}"])
    assert code == 1
    assert f"{bad}:2" in capsys.readouterr().err
    assert dir_snapshot(out) == before


def test_failed_write_keeps_previous_outputs_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"prompt {i}", "user_id": f"u{i}"} for i in range(30)])
    out = tmp_path / "out"
    prepare.run(Config(input=str(src), output_dir=str(out), seed=1))
    before = dir_snapshot(out)

    real_write = prepare.atomic_write_text
    calls = []

    def failing_write(path, text):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(prepare, "atomic_write_text", failing_write)
    with pytest.raises(OSError):
        prepare.run(Config(input=str(src), output_dir=str(out), seed=2))
    assert len(calls) == 3
    assert dir_snapshot(out) == before  # no staging folder, no temporary file, old outputs intact


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["valid_fraction=0.6", "test_fraction=0.5"], "must be < 1"),
        (["test_fraction=1.0"], "test_fraction"),
        (["valid_fraction=-0.1"], "valid_fraction"),
        (["max_prompts_per_user=0"], "max_prompts_per_user"),
        (["dedup_prefix_chars=-1"], "dedup_prefix_chars"),
    ],
)
def test_config_validation(tmp_path, overrides, message):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    with pytest.raises(ConfigError, match=message):
        load_config(Config, None, [f"input={src}", *overrides])
    load_config(Config, None, [f"input={src}"])  # the defaults are valid


def test_config_rejects_input_that_the_outputs_would_overwrite(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "x"}])
    with pytest.raises(ConfigError, match="overwritten"):
        load_config(Config, None, [f"input={src}", f"output_dir={tmp_path}"])


def test_config_rejects_missing_input(tmp_path):
    with pytest.raises(ConfigError, match="input"):
        load_config(Config, None, [f"input={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="input"):
        load_config(Config, None, [])


def test_config_fields_are_documented():
    from instructrl.config import field_docs

    docs = field_docs(Config)
    assert {f.name for f in dataclasses.fields(Config)} == set(docs)
    assert all(docs.values())
