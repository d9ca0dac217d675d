"""Validation of labeler input: every field's rules, limits and normalization."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from instructrl.data.records import Comparison
from instructrl.label import forms


def _ranking_form(k: int, ranks=None, quality=None, flags=None) -> MultiDict:
    data = MultiDict()
    for p in range(k):
        data.add(f"rank_{p}", str((ranks or list(range(1, k + 1)))[p]))
        data.add(f"quality_{p}", str((quality or [4] * k)[p]))
        for flag in (flags or {}).get(p, ()):
            data.add(f"flag_{p}", flag)
    return data


def test_ranks_to_ranking_groups_ties_best_first():
    assert forms.ranks_to_ranking([2, 1, 2, 4]) == (1, (0, 2), 3)
    assert forms.ranks_to_ranking([1, 2, 3, 4]) == (0, 1, 2, 3)
    assert forms.ranks_to_ranking([3, 3, 3]) == ((0, 1, 2),)


@given(st.lists(st.integers(1, 9), min_size=2, max_size=9))
def test_ranking_round_trips_through_ranks_and_is_a_valid_comparison(ranks):
    ranking = forms.ranks_to_ranking(ranks)
    comparison = Comparison("p", [str(i) for i in range(len(ranks))], ranking)  # raises if not a permutation
    dense = forms.ranking_to_ranks([list(e) if isinstance(e, tuple) else e for e in ranking], len(ranks))
    # same order relation as the input ranks, 1-based and dense
    assert [r - 1 for r in dense] == comparison.ranks()
    for i in range(len(ranks)):
        for j in range(len(ranks)):
            assert (ranks[i] < ranks[j]) == (dense[i] < dense[j])


def test_parse_ranking_reads_ranks_quality_and_flags():
    form = _ranking_form(4, ranks=[2, 1, 2, 3], quality=[5, 7, 5, 1], flags={3: ["hallucination", "harmful_content"]})
    parsed = forms.parse_ranking(form, 4)
    assert parsed.ranking == (1, (0, 2), 3)
    assert [r.quality for r in parsed.ratings] == [5, 7, 5, 1]
    assert parsed.ratings[3].flags == {"hallucination", "harmful_content"}
    assert parsed.ratings[0].flags == frozenset()


NOT_WHOLE_NUMBERS = ["-1", "1.5", "9" * 50, "²", "٣", "abc"]
"""Refused by every number field of the ranking form (superscripts and other scripts' digits included)."""


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [(field, value, "whole number") for field in ("rank_1", "quality_2") for value in NOT_WHOLE_NUMBERS]
    + [(field, "", "missing") for field in ("rank_1", "quality_2")]
    + [("rank_1", "0", "from 1 to 4"), ("rank_1", "5", "from 1 to 4")]
    + [("quality_2", "0", "from 1 to 7"), ("quality_2", "8", "from 1 to 7")],
)
def test_parse_ranking_rejects_bad_numbers(field, value, message):
    form = _ranking_form(4)
    form.setlist(field, [value])
    with pytest.raises(forms.FormError) as info:
        forms.parse_ranking(form, 4)
    assert list(info.value.errors) == [field]
    assert message in info.value.errors[field]


def test_parse_ranking_rejects_missing_responses_and_unknown_flags():
    form = _ranking_form(3)
    with pytest.raises(forms.FormError) as info:  # the form has 3 responses, the item 4
        forms.parse_ranking(form, 4)
    assert set(info.value.errors) == {"rank_3", "quality_3"}
    form = _ranking_form(3, flags={0: ["hallucination", "<script>"]})
    with pytest.raises(forms.FormError) as info:
        forms.parse_ranking(form, 3)
    assert "<script>" in info.value.errors["flag_0"]


def test_parse_demonstration_normalizes_and_limits_text():
    assert forms.parse_demonstration(MultiDict({"response": "  line 1\r\nline 2\r  "})) == "line 1\nline 2"
    assert forms.parse_demonstration(MultiDict({"response": "tab\tok"})) == "tab\tok"
    limit = forms.MAX_DEMONSTRATION_CHARS
    assert len(forms.parse_demonstration(MultiDict({"response": "x" * limit}))) == limit
    for bad, message in [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("x" * (limit + 1), "limit"),
        ("bell\x07", "control characters"),
        ("nul\x00", "control characters"),
        ("half a character: \ufffd", "U\\+FFFD"),
    ]:
        with pytest.raises(forms.FormError, match=message):
            forms.parse_demonstration(MultiDict({"response": bad}))
    with pytest.raises(forms.FormError, match="empty"):
        forms.parse_demonstration(MultiDict())


def test_generated_text_is_held_to_the_labelers_rules_with_visible_marks():
    """Model samples get the form's normalization; what a labeler could not type is replaced by a visible mark
    and counted, so the stored text passes the same check as a labeler's."""
    text, replaced = forms.clean_generated_text(" nul\x00 esc\x1b[0m del\x7f c1\x85 bad\ufffd\r\nok\t ")
    assert text == "nul\u2400 esc\u241b[0m del\u2421 c1\u2370 bad\u2370\nok"
    assert replaced == {"control": 4, "U+FFFD": 1}
    assert forms.clean_text(text, 10_000, required=True) == text
    assert forms.clean_generated_text("plain\ttext\n") == ("plain\ttext", {})


def test_an_all_tied_ranking_needs_the_labelers_confirmation():
    form = _ranking_form(4, ranks=[1, 1, 1, 1])
    with pytest.raises(forms.FormError) as error:
        forms.parse_ranking(form, 4)
    assert "equally good" in error.value.errors["confirm_all_tied"]
    form.add("confirm_all_tied", "1")
    assert forms.parse_ranking(form, 4).ranking == ((0, 1, 2, 3),)
    assert forms.parse_ranking(_ranking_form(4, ranks=[1, 1, 1, 2]), 4).ranking == ((0, 1, 2), 3)  # a partial tie


def test_parse_skip_needs_a_known_reason_and_a_note_for_other():
    assert forms.parse_skip(MultiDict({"reason": "unclear"})) == ("unclear", "")
    assert forms.parse_skip(MultiDict({"reason": "other", "note": " odd "})) == ("other", "odd")
    with pytest.raises(forms.FormError) as info:
        forms.parse_skip(MultiDict({"reason": "bored"}))
    assert "reason" in info.value.errors
    with pytest.raises(forms.FormError) as info:
        forms.parse_skip(MultiDict({"reason": "other"}))
    assert "note" in info.value.errors
    with pytest.raises(forms.FormError, match="limit"):
        forms.parse_skip(MultiDict({"reason": "unclear", "note": "n" * (forms.MAX_NOTE_CHARS + 1)}))


def test_parse_submission_meta():
    key = "0123456789abcdef0123456789abcdef"
    assert forms.parse_submission_meta(MultiDict({"submission_key": key})) == forms.SubmissionMeta(key, None)
    assert forms.parse_submission_meta(MultiDict({"submission_key": key, "version": "3"})).expected_version == 3
    for bad in [{}, {"submission_key": key.upper()}, {"submission_key": key[:-1]}, {"submission_key": key + "0"}]:
        with pytest.raises(forms.FormError, match="submission_key"):
            forms.parse_submission_meta(MultiDict(bad))
    with pytest.raises(forms.FormError, match="version"):
        forms.parse_submission_meta(MultiDict({"submission_key": key, "version": "0"}))


def test_parse_login_limits_lengths():
    assert forms.parse_login(MultiDict({"username": " alice ", "secret": "s e c r e t"})) == ("alice", "s e c r e t")
    with pytest.raises(forms.FormError) as info:
        forms.parse_login(MultiDict({"username": "a" * 65, "secret": "x" * 257}))
    assert set(info.value.errors) == {"username", "secret"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/task/3", "/task/3"),
        ("/?a=b", "/?a=b"),
        ("//evil.example/x", None),
        ("https://evil.example/", None),
        ("/\\evil.example", None),
        ("/x\nSet-Cookie: a", None),
        ("relative", None),
        (None, None),
        ("/" + "a" * 300, None),
    ],
)
def test_safe_next_url_allows_only_local_paths(value, expected):
    assert forms.safe_next_url(value) == expected
