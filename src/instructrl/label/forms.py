"""Validation of everything a labeler submits: every field is checked, length-limited and normalized here.

The parsers take the submitted form (anything with ``get(name)`` and ``getlist(name)``, e.g. Werkzeug's
``MultiDict``) and return plain values, or raise :class:`FormError` mapping each bad field to a message
that the page shows next to it. Unknown fields are ignored.

A comparison form carries, for each response at canonical position p (0..K-1):

* ``rank_p``: its rank, an integer 1..K, 1 best; equal ranks are a tie. The ranking widget (drag and drop,
  keyboard) only sets these fields, so the page also works without JavaScript.
* ``quality_p``: overall quality on the paper's 1-7 Likert scale (Ouyang et al. 2022, App. B).
* ``flag_p`` (repeated): the metadata flags that apply, names from :data:`FLAGS`.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Sequence
from typing import Any, Protocol

from instructrl.data.records import RankingElement

MAX_DEMONSTRATION_CHARS = 10_000
MAX_NOTE_CHARS = 1_000
MAX_USERNAME_CHARS = 64
MAX_SECRET_CHARS = 256
MAX_K = 9
QUALITY_MIN, QUALITY_MAX = 1, 7
SUBMISSION_KEY = re.compile(r"^[0-9a-f]{32}$")
_ASCII_NUMBER = re.compile(r"^[0-9]{1,3}$")
MAX_FORM_BYTES = 256 * 1024
"""Requests with a larger body are refused before they are parsed."""

FLAGS: dict[str, str] = {
    "fails_instruction": "Fails to follow the instruction / task",
    "inappropriate_for_customer": "Inappropriate for a customer assistant",
    "hallucination": "Hallucination (makes up facts, or contradicts the prompt)",
    "sexual_content": "Contains sexual content",
    "violent_content": "Contains violent content",
    "harmful_content": "Harmful (encourages violence, abuse or self-harm, or gives harmful advice)",
}
"""The paper's per-output metadata (Ouyang et al. 2022, App. B, Table 3): field name -> question shown."""

SKIP_REASONS: dict[str, str] = {
    "unclear": "The prompt is unclear or cannot be answered",
    "needs_expertise": "It needs expertise I do not have",
    "language": "It is in a language I cannot label",
    "sensitive": "Sensitive content I prefer not to label",
    "broken_responses": "The responses are broken or unreadable",
    "other": "Other (explain in the note)",
}


class FormData(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...

    def getlist(self, key: str) -> list[Any]: ...


class FormError(ValueError):
    """One or more invalid fields: ``errors`` maps a field name to what is wrong with it."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


REPLACEMENT_CHARACTER = "\ufffd"
"""What a decoder puts where bytes were not valid UTF-8 (e.g. a token cut in the middle of a character)."""
UNKNOWN_MARK = "\u2370"
"""Shown in place of U+FFFD and of control characters that have no Unicode control picture."""


def is_unprintable(char: str) -> bool:
    """Characters refused in stored text: control characters other than newline and tab (invisible on the
    page, they only ever arrive by accident or by intent) and U+FFFD (the trace of undecodable bytes)."""
    return char == REPLACEMENT_CHARACTER or (unicodedata.category(char) == "Cc" and char not in "\n\t")


def _normalize_text(value: str) -> str:
    return value.replace("\r\n", "\n").replace("\r", "\n").strip()


def clean_text(value: Any, max_chars: int, *, required: bool) -> str:
    """Normalize line breaks, strip surrounding whitespace, and check length and characters.

    Raises ``ValueError`` with the message for the field; unprintable characters (:func:`is_unprintable`)
    are refused.
    """
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValueError("must be text")
    text = _normalize_text(value)
    if len(text) > max_chars:
        raise ValueError(f"is {len(text)} characters long; the limit is {max_chars}")
    if any(c == REPLACEMENT_CHARACTER for c in text):
        raise ValueError("contains U+FFFD replacement characters (text that was not valid UTF-8)")
    if any(is_unprintable(c) for c in text):
        raise ValueError("contains control characters")
    if required and not text:
        raise ValueError("is empty")
    return text


def visible_mark(char: str) -> str:
    """What an unprintable character is shown as: its Unicode control picture (NUL -> U+2400 '␀', ESC -> '␛',
    DEL -> '␡'), else :data:`UNKNOWN_MARK`."""
    code = ord(char)
    if code < 0x20:
        return chr(0x2400 + code)
    return "\u2421" if code == 0x7F else UNKNOWN_MARK


def clean_generated_text(text: str) -> tuple[str, dict[str, int]]:
    """Model output made storable like a labeler's text (:func:`clean_text`'s normalization, no length limit):
    each unprintable character is replaced by its :func:`visible_mark`, so labelers see where it was.

    Returns the text and what was replaced: ``{"control": n, "U+FFFD": m}`` (only the non-zero counts).
    """
    replaced: dict[str, int] = {}
    out = []
    for char in _normalize_text(text):
        if is_unprintable(char):
            kind = "U+FFFD" if char == REPLACEMENT_CHARACTER else "control"
            replaced[kind] = replaced.get(kind, 0) + 1
            char = visible_mark(char)
        out.append(char)
    return "".join(out), replaced


def parse_small_int(value: Any) -> int:
    """An ASCII number of 1-3 digits, e.g. a rank or a score (``ValueError`` otherwise)."""
    if not isinstance(value, str) or not _ASCII_NUMBER.match(value.strip()):
        raise ValueError(f"not a small number: {value!r:.20}")
    return int(value)


def _parse_int(value: Any, low: int, high: int) -> int:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("is missing")
    text = value.strip()
    if not _ASCII_NUMBER.match(text):  # not str.isdigit(): it accepts '²', which int() refuses
        raise ValueError(f"must be a whole number from {low} to {high}")
    number = int(text)
    if not low <= number <= high:
        raise ValueError(f"must be from {low} to {high}")
    return number


@dataclasses.dataclass(frozen=True)
class SubmissionMeta:
    key: str
    """Random per-rendered-form key: the same form submitted twice is stored once."""
    expected_version: int | None
    """For edits: the label version the form was rendered from (stale edits are refused)."""


def parse_submission_meta(form: FormData) -> SubmissionMeta:
    errors = {}
    key = form.get("submission_key") or ""
    if not isinstance(key, str) or not SUBMISSION_KEY.match(key):
        errors["submission_key"] = "is missing or malformed; reload the page"
    version_raw = form.get("version")
    version = None
    if version_raw not in (None, ""):
        try:
            version = _parse_int(version_raw, 1, 999)
        except ValueError as e:
            errors["version"] = str(e)
    if errors:
        raise FormError(errors)
    return SubmissionMeta(key, version)


def parse_demonstration(form: FormData) -> str:
    """The written response of a demonstration form."""
    try:
        return clean_text(form.get("response"), MAX_DEMONSTRATION_CHARS, required=True)
    except ValueError as e:
        raise FormError({"response": f"The response {e}."}) from None


@dataclasses.dataclass(frozen=True)
class ResponseRatingInput:
    quality: int
    flags: frozenset[str]


@dataclasses.dataclass(frozen=True)
class RankingInput:
    ranking: tuple[RankingElement, ...]
    """Canonical positions best first; a tuple is a tie group."""
    ratings: tuple[ResponseRatingInput, ...]
    """Per canonical position."""


ALL_TIED_MESSAGE = (
    "You ranked every response the same, which tells the reward model nothing. Rank them, or tick "
    "“They are all equally good” to confirm the tie."
)


def ranks_to_ranking(ranks: Sequence[int]) -> tuple[RankingElement, ...]:
    """Rank numbers per position (lower is better, equal = tied) -> ranking of positions, best first.

    ``[2, 1, 2, 4]`` -> ``(1, (0, 2), 3)``: position 1 is best, 0 and 2 tie next, 3 is last.
    """
    ranking: list[RankingElement] = []
    for rank in sorted(set(ranks)):
        group = tuple(i for i, r in enumerate(ranks) if r == rank)
        ranking.append(group[0] if len(group) == 1 else group)
    return tuple(ranking)


def ranking_to_ranks(ranking: Sequence[Any], k: int) -> list[int]:
    """Inverse of :func:`ranks_to_ranking` with dense 1-based ranks (a stored JSON ranking -> form values)."""
    ranks = [0] * k
    for group_rank, element in enumerate(ranking, start=1):
        for position in element if isinstance(element, (list, tuple)) else (element,):
            ranks[position] = group_rank
    return ranks


def parse_ranking(form: FormData, k: int) -> RankingInput:
    """Ranks, quality scores and flags of the ``k`` responses of a comparison form."""
    errors: dict[str, str] = {}
    ranks: list[int] = []
    ratings: list[ResponseRatingInput] = []
    for p in range(k):
        try:
            ranks.append(_parse_int(form.get(f"rank_{p}"), 1, k))
        except ValueError as e:
            errors[f"rank_{p}"] = f"The rank {e}."
        try:
            quality = _parse_int(form.get(f"quality_{p}"), QUALITY_MIN, QUALITY_MAX)
        except ValueError as e:
            errors[f"quality_{p}"] = f"The overall quality score {e}."
            quality = 0
        flags = form.getlist(f"flag_{p}")
        unknown = sorted({str(f)[:40] for f in flags if f not in FLAGS})
        if unknown or len(flags) > len(FLAGS):
            errors[f"flag_{p}"] = f"Unknown flags: {', '.join(unknown)}." if unknown else "Too many flags."
        ratings.append(ResponseRatingInput(quality, frozenset(f for f in flags if f in FLAGS)))
    # a ranking that ties everything gives no pair to train on: accept it only when the labeler confirms it
    if len(ranks) == k > 1 and len(set(ranks)) == 1 and form.get("confirm_all_tied") != "1":
        errors["confirm_all_tied"] = ALL_TIED_MESSAGE
    if errors:
        raise FormError(errors)
    return RankingInput(ranks_to_ranking(ranks), tuple(ratings))


def parse_skip(form: FormData) -> tuple[str, str]:
    """``(reason, note)`` of a skip form; the note is required for reason ``other``."""
    errors = {}
    reason = form.get("reason")
    if reason not in SKIP_REASONS:
        errors["reason"] = "Choose a reason for skipping."
    try:
        note = clean_text(form.get("note"), MAX_NOTE_CHARS, required=reason == "other")
    except ValueError as e:
        errors["note"] = f"The note {e}."
        note = ""
    if errors:
        raise FormError(errors)
    return reason, note


def parse_login(form: FormData) -> tuple[str, str]:
    """``(username, secret)`` of the login form, length-checked (the secret is not otherwise altered)."""
    username, secret = form.get("username"), form.get("secret")
    errors = {}
    if not isinstance(username, str) or not username.strip() or len(username) > MAX_USERNAME_CHARS:
        errors["username"] = "Enter your username."
    if not isinstance(secret, str) or not secret or len(secret) > MAX_SECRET_CHARS:
        errors["secret"] = "Enter your secret."
    if errors:
        raise FormError(errors)
    return username.strip(), secret


def safe_next_url(value: Any) -> str | None:
    """A same-site path to return to after login, or None (no open redirects to other hosts)."""
    if not isinstance(value, str) or len(value) > 200:
        return None
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return None
    if any(unicodedata.category(c) == "Cc" for c in value):
        return None
    return value
