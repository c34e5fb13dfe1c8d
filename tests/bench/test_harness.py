"""The harness reports the median of per-round ratios of alternating rounds."""

from __future__ import annotations

import pytest

from bench.harness import Comparison, Result, compare_rates


def test_comparison_is_the_median_of_per_round_ratios() -> None:
    comparison = Comparison.of([2.0, 4.0, 9.0], [1.0, 4.0, 3.0])  # ratios 2, 1, 3
    assert comparison == Comparison(value=4.0, anchor_value=3.0, ratio=2.0)
    assert comparison.value / comparison.anchor_value != comparison.ratio  # not the medians'


def test_result_of_carries_the_paired_ratio_to_the_json() -> None:
    result = Result.of("m", Comparison.of([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]), "x/s", "anchor")
    assert (result.value, result.anchor_value, result.ratio) == (4.0, 3.0, 2.0)
    data = result.to_json()
    assert data["ratio"] == 2.0
    assert "paired_ratio" not in data
    assert set(data) == {"metric", "value", "unit", "anchor", "anchor_value", "ratio"}


def test_a_result_without_paired_rounds_divides_its_figures() -> None:
    assert Result("m", 3.0, "x/s", "anchor", 4.0).ratio == 0.75


@pytest.mark.parametrize(("subject", "anchor"), [([1.0, 2.0], [1.0]), ([], [])])
def test_rounds_must_pair_up(subject: list[float], anchor: list[float]) -> None:
    with pytest.raises(ValueError, match="one anchor round for each subject round"):
        Comparison.of(subject, anchor)


def test_compare_rates_alternates_anchor_first() -> None:
    calls: list[str] = []
    subject, anchor = iter([2.0, 4.0, 9.0]), iter([1.0, 4.0, 3.0])

    def subject_round() -> float:
        calls.append("subject")
        return next(subject)

    def anchor_round() -> float:
        calls.append("anchor")
        return next(anchor)

    assert compare_rates(subject_round, anchor_round, rounds=3) == (4.0, 3.0, 2.0)
    assert calls == ["anchor", "subject"] * 3
