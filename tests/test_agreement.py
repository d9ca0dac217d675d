"""Inter-labeler agreement (the one estimator of the labeling app and the sandbox): definition, pooling, SE by hand."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from instructrl.agreement import agreement_report, pair_agreement, pooled_estimate


def test_identical_rankings_agree_on_every_pair():
    assert pair_agreement([0, 1, 2, 3], [0, 1, 2, 3]) == (6, 6)


def test_reversed_rankings_agree_on_no_pair():
    assert pair_agreement([0, 1, 2, 3], [3, 2, 1, 0]) == (0, 6)


def test_one_swap_disagrees_on_one_pair():
    # b swaps responses 2 and 3: of the 6 pairs only (2, 3) is ordered differently
    assert pair_agreement([0, 1, 2, 3], [0, 1, 3, 2]) == (5, 6)


def test_pairs_tied_by_either_labeler_are_left_out():
    # a ties 0 and 1; b ties 2 and 3: pairs (0,1) and (2,3) drop out, 4 remain, (0,2),(0,3),(1,2),(1,3)
    a = [0, 0, 1, 2]
    b = [0, 1, 2, 2]
    assert pair_agreement(a, b) == (4, 4)
    assert pair_agreement([0, 0], [0, 1]) == (0, 0)


def test_pair_agreement_needs_equal_lengths():
    with pytest.raises(ValueError, match="different lengths"):
        pair_agreement([0, 1], [0, 1, 2])


@given(st.permutations(range(5)), st.permutations(range(5)))
def test_agreement_is_one_minus_normalized_kendall_distance(a, b):
    discordant = sum(
        (a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in itertools.combinations(range(5), 2)
    )  # Kendall tau distance
    assert pair_agreement(a, b) == (10 - discordant, 10)
    assert pair_agreement(a, b) == pair_agreement(b, a)


def test_pooled_estimate_and_standard_error_by_hand():
    units = [(5, 6), (6, 6), (3, 6)]
    est = pooled_estimate(units)
    p = 14 / 18
    assert est.agreement == pytest.approx(p)
    residuals = [5 - 6 * p, 6 - 6 * p, 3 - 6 * p]
    assert est.stderr == pytest.approx(math.sqrt(3 / 2 * sum(r * r for r in residuals)) / 18)
    assert (est.n_pairs, est.n_units) == (18, 3)


def test_pooled_estimate_edge_cases():
    assert pooled_estimate([]).agreement is None
    assert pooled_estimate([(0, 0)]).n_units == 0
    single = pooled_estimate([(3, 4)])
    assert single.agreement == 0.75 and single.stderr is None  # one unit: no spread to estimate


def test_report_per_labeler_and_pair():
    ranks = {
        1: {"alice": [0, 1, 2, 3], "bob": [0, 1, 3, 2], "carol": [3, 2, 1, 0]},  # a-b 5/6, a-c 0/6, b-c 1/6
        2: {"alice": [0, 1, 2, 3], "bob": [0, 1, 2, 3]},  # a-b 6/6
        3: {"alice": [1, 0, 2, 3]},  # one labeler only: ignored
    }
    report = agreement_report(ranks)
    assert report.n_items == 2
    # one unit per item, summed over its labeler pairs: item 1 (6, 18), item 2 (6, 6); p = 1/2
    assert report.overall.agreement == pytest.approx((5 + 0 + 1 + 6) / 24)
    assert report.overall.n_units == 2
    assert report.overall.stderr == pytest.approx(math.sqrt(2 / 1 * ((6 - 9) ** 2 + (6 - 3) ** 2)) / 24)
    assert report.per_pair[("alice", "bob")].agreement == pytest.approx(11 / 12)
    assert report.per_pair[("alice", "carol")].agreement == 0
    # alice's units: item 1 (5 + 0, 12), item 2 (6, 6)
    assert report.per_labeler["alice"].agreement == pytest.approx((5 + 0 + 6) / 18)
    assert report.per_labeler["alice"].n_units == 2
    assert report.per_labeler["carol"].agreement == pytest.approx(1 / 12)
    assert "alice" in report.per_labeler and set(report.per_labeler) == {"alice", "bob", "carol"}


def test_standard_error_resamples_items_not_labeler_pairs():
    # Three labelers per item. Items 1-2: all agree (each pair 6/6). Items 3-4: c reverses a and b, so two of
    # the item's three labeler pairs disagree together: they are one draw, not two.
    same, reverse = [0, 1, 2, 3], [3, 2, 1, 0]
    ranks = {x: {"a": same, "b": same, "c": same} for x in (1, 2)} | {
        x: {"a": same, "b": same, "c": reverse} for x in (3, 4)
    }
    report = agreement_report(ranks)
    # items (18, 18), (18, 18), (6, 18), (6, 18): p = 48/72, residuals ±6
    assert report.overall.agreement == pytest.approx(2 / 3)
    by_hand = math.sqrt(4 / 3 * 4 * 6**2) / 72
    assert report.overall.stderr == pytest.approx(by_hand)
    # (item, labeler pair) units would count 12 independent samples and understate the error
    pair_units = [pair_agreement(r[a], r[b]) for r in ranks.values() for a, b in itertools.combinations("abc", 2)]
    assert pooled_estimate(pair_units).stderr < 0.75 * by_hand


def test_labeler_ids_keep_their_natural_order():
    # integer ids (the sandbox's) sort as numbers, so pair (2, 10) is not turned into (10, 2)
    report = agreement_report({1: {10: [0, 1], 2: [0, 1]}, 2: {2: [1, 0], 10: [0, 1]}})
    assert list(report.per_pair) == [(2, 10)] and list(report.per_labeler) == [2, 10]
    assert report.per_pair[(2, 10)].agreement == 0.5


def test_describe_formats_percent():
    est = pooled_estimate([(5, 6), (6, 6)])
    assert est.describe().startswith("91.7% ± ")
    assert "n/a" in pooled_estimate([]).describe()
