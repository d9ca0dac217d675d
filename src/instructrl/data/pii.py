"""Find and replace personally identifiable information (PII) in prompt text.

InstructGPT filtered PII out of the API prompts it trained on (Ouyang et al. 2022, §3.2). This module
covers the kinds that can be recognised from their shape alone, each replaced by a placeholder:

* ``[EMAIL]``: ``local@domain.tld`` with a letters-only top-level domain of 2+ characters.
* ``[PHONE]``: international ``+CC ...`` numbers with 8–15 digits (E.164 allows at most 15); North
  American ``(415) 555-2671``, ``415-555-2671``, ``1 415.555.2671``, where area code and exchange start
  with 2–9 and the groups are separated; trunk-prefixed national numbers ``020 7946 0958``,
  ``01 23 45 67 89``, ``07700900123`` (a leading 0 and 10–11 digits in all).
* ``[CARD]``: 13–19 digits, not starting with 0, passing the Luhn check, either unbroken or printed the
  way cards are (blocks of four with a possibly shorter last block, or Amex / Diners 4-6-5 / 4-6-4),
  separated by single spaces or by single dashes.
* ``[IP]``: dotted-quad IPv4 (octets 0–255, not part of a longer dotted number such as the version
  ``1.2.3.4.5``) and IPv6 as accepted by :mod:`ipaddress`; a ``::``-compressed IPv6 needs a digit and two
  groups, so ``::1``, ``1::`` and slicing like ``a[::2]`` are not matched.

What is deliberately *not* matched, so ordinary text survives: years and counts ("in 2023 we sold 15
items for $40"), prices with thousands separators ("$1,299.99"), dates ("2023-05-17", "01-02-2023"),
three-part version numbers ("v1.2.3"), clock times ("12:30:45"), MAC addresses, and unformatted 10-digit
runs (order numbers look the same as US phone numbers without separators). Names and street addresses
need a language model or a gazetteer and are out of scope.

Overlapping matches are resolved left to right: the earliest match wins, then the longest, so an e-mail
address made of digits is one ``[EMAIL]``, not a ``[CARD]`` plus a domain. :func:`scrub` repeats until
:func:`find_pii` finds nothing, so its output never contains a match.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterator

KINDS = ("EMAIL", "PHONE", "CARD", "IP")
"""Every PII kind, in the order used for reports."""

Span = tuple[int, int]
"""Half-open character range ``[start, end)`` into the text."""

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])"
)

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not preceded by a word character or a dot, not followed by another ".digit": so "1.2.3.4.5" (a version)
# and "v1.2.3.4" are left alone, while "10.0.0.1." at the end of a sentence still matches.
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")

# IPv6 candidates: a run of hex digits, colons and dots holding at least two colons; ipaddress decides.
# Bounded repeats: an IPv6 address has at most 45 characters, and long hex runs must not cost quadratic time.
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])[0-9A-Fa-f:.]{0,45}:[0-9A-Fa-f.]{0,45}:[0-9A-Fa-f:.]{0,45}(?![\w:])")

# Every group after the first starts with a separator or a parenthesis, so a digit run splits only one way
# and a failed match backtracks over the number of groups only (no catastrophic backtracking).
_PHONE_INTERNATIONAL = re.compile(r"(?<![\w+])\+\d+(?:[ .-]?\(\d{1,4}\)[ .-]?\d+|[ .-]\d+){0,6}(?!\w|[.-]\d)")
# North American Numbering Plan: area code and exchange start with 2-9; groups must be separated (or the
# area code parenthesised), because a bare 10-digit run is as likely an order number as a phone number.
_PHONE_NANP = re.compile(
    r"(?<![\w+.-])(?:\+?1[ .-])?(?:\([2-9]\d\d\)[ .-]?|[2-9]\d\d[ .-])[2-9]\d\d[ .-]\d{4}(?!\w|[.-]\d)"
)
# Trunk-prefixed national numbers (UK, France, Germany, ...): a leading 0, then digit groups.
_PHONE_TRUNK = re.compile(r"(?<![\w+.-])0\d+(?:[ .-]\d+){0,4}(?!\w|[.-]\d)")

# Card candidates: digit groups joined by single spaces or dashes; Luhn-valid windows are picked out below.
_DIGIT_RUN = re.compile(r"(?<![\w.,+-])\d+(?:[ -]\d+)*(?!\w|[.,]\d)")
_DIGIT_GROUP = re.compile(r"\d+")

_PRIORITY = {"EMAIL": 0, "IP": 1, "CARD": 2, "PHONE": 3}
"""Tie-break between matches with the same start and length (lower wins)."""


def luhn_valid(digits: str) -> bool:
    """Luhn (mod 10) check used by payment cards.

    From the rightmost digit d_0, double every second digit (d_1, d_3, ...), subtract 9 from doubles
    above 9, and require ``Σ ≡ 0 (mod 10)``.
    """
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _count_digits(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


def _find_emails(text: str) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        yield m.span()


def _find_ipv4(text: str) -> Iterator[Span]:
    for m in _IPV4.finditer(text):
        yield m.span()


def _is_ipv6(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    if candidate.count("::") == 0:
        return True  # all eight groups written out
    # A compressed form must hold a digit and two groups, so slicing ("a[::2]") and "::" are left alone.
    groups = [g for g in re.split(r"[:.]", candidate) if g]
    return len(groups) >= 2 and any(ch.isdigit() for ch in candidate)


def _find_ipv6(text: str) -> Iterator[Span]:
    for m in _IPV6_CANDIDATE.finditer(text):
        start, end = m.span()
        # Sentence punctuation may trail the address ("... at fe80::1."); try shorter ends.
        while end - start >= 2:
            if _is_ipv6(text[start:end]):
                yield start, end
                break
            if text[end - 1] not in ".:":
                break
            end -= 1


def _longest_prefix_with_digits(text: str, match: re.Match[str], low: int, high: int) -> Span | None:
    """The longest prefix of ``match`` ending after a digit group and holding ``low``–``high`` digits.

    The phone patterns take as many groups as they can; a number followed by more digits ("call +44 20 7946
    0958 2023") is cut back to the groups that fit instead of being dropped.
    """
    start = match.start()
    for group in reversed(list(_DIGIT_GROUP.finditer(text, start, match.end()))):
        end = group.end()
        if text[end : end + 1] == ")":  # "(0)" belongs to the number that follows it
            continue
        if low <= _count_digits(text[start:end]) <= high:
            return start, end
    return None


def _find_phones(text: str) -> Iterator[Span]:
    for pattern, low, high in ((_PHONE_INTERNATIONAL, 8, 15), (_PHONE_TRUNK, 10, 11)):
        for m in pattern.finditer(text):
            span = _longest_prefix_with_digits(text, m, low, high)
            if span is not None:
                yield span
    for m in _PHONE_NANP.finditer(text):
        yield m.span()


def _find_cards(text: str) -> Iterator[Span]:
    """Luhn-valid windows of 13–19 digits, grouped as cards are printed, in runs of digit groups.

    A run of space/dash separated digit groups may hold more than a card ("4111 1111 1111 1111 2023"), so
    every window of whole groups is a candidate. A window counts when its digits pass the Luhn check and it
    is grouped like a card: one block, blocks of four with a shorter last block, or Amex / Diners 4-6-5 /
    4-6-4, with one kind of separator. The longest such window is taken, then the groups left and right of
    it are searched again.
    """
    for run in _DIGIT_RUN.finditer(text):
        groups = [(g.start(), g.end()) for g in _DIGIT_GROUP.finditer(text, run.start(), run.end())]
        yield from _card_windows(text, groups)


_CARD_BLOCKS = ((4, 6, 5), (4, 6, 4))
"""Block lengths of American Express (15 digits) and Diners Club (14 digits) numbers."""


def _grouped_like_card(text: str, groups: list[Span]) -> bool:
    lengths = tuple(end - start for start, end in groups)
    separators = {text[a[1] : b[0]] for a, b in zip(groups, groups[1:])}
    if len(separators) > 1:
        return False
    return (
        len(lengths) == 1 or lengths in _CARD_BLOCKS or (all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4)
    )


def _card_windows(text: str, groups: list[Span]) -> Iterator[Span]:
    best: tuple[int, int, int] | None = None  # (-n_digits, first group, last group)
    for i in range(len(groups)):
        digits = ""
        for j in range(i, len(groups)):
            digits += text[groups[j][0] : groups[j][1]]
            if len(digits) > 19:
                break
            window = groups[i : j + 1]
            # No card number starts with 0 (ISO/IEC 7812 issuer ids), which also spares zero-padded ids.
            if len(digits) >= 13 and digits[0] != "0" and _grouped_like_card(text, window) and luhn_valid(digits):
                key = (-len(digits), i, j)
                if best is None or key < best:
                    best = key
    if best is None:
        return
    _, i, j = best
    yield from _card_windows(text, groups[:i])
    yield groups[i][0], groups[j][1]
    yield from _card_windows(text, groups[j + 1 :])


def find_pii(text: str) -> list[tuple[str, Span]]:
    """Every PII match in ``text`` as ``(kind, (start, end))``, non-overlapping and sorted by start.

    Where candidates overlap, the one starting first wins, then the longest, then by kind
    ``EMAIL > IP > CARD > PHONE``.
    """
    candidates: list[tuple[str, Span]] = []
    candidates += [("EMAIL", s) for s in _find_emails(text)]
    candidates += [("IP", s) for s in _find_ipv4(text)]
    candidates += [("IP", s) for s in _find_ipv6(text)]
    candidates += [("CARD", s) for s in _find_cards(text)]
    candidates += [("PHONE", s) for s in _find_phones(text)]
    candidates.sort(key=lambda c: (c[1][0], -(c[1][1] - c[1][0]), _PRIORITY[c[0]]))
    chosen: list[tuple[str, Span]] = []
    covered_until = 0
    for kind, (start, end) in candidates:
        if start >= covered_until:
            chosen.append((kind, (start, end)))
            covered_until = end
    return chosen


def placeholder(kind: str) -> str:
    """The text that replaces a match of ``kind``, e.g. ``[EMAIL]``."""
    return f"[{kind}]"


def replace_spans(text: str, matches: list[tuple[str, Span]]) -> str:
    """Replace each non-overlapping, start-sorted match with its placeholder."""
    parts = []
    cursor = 0
    for kind, (start, end) in matches:
        parts.append(text[cursor:start])
        parts.append(placeholder(kind))
        cursor = end
    parts.append(text[cursor:])
    return "".join(parts)


def scrub(text: str) -> tuple[str, Counter[str]]:
    """Replace every PII match with its placeholder; returns the new text and the count per kind.

    Replacement repeats until :func:`find_pii` finds nothing. Each pass removes at least one digit, ``@``
    or ``:`` and placeholders add none, so the loop ends; in practice one pass suffices.
    """
    counts: Counter[str] = Counter()
    while True:
        matches = find_pii(text)
        if not matches:
            return text, counts
        counts.update(kind for kind, _ in matches)
        text = replace_spans(text, matches)
