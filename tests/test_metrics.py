"""Repetition metrics and the collapse rule against values worked out by hand."""

from __future__ import annotations

import math
import zlib

import pytest

from collapse_tui.metrics import (
    CollapseDetector,
    compression_ratio,
    distinct_1,
    format_rate,
    format_rep4,
    repeated_ngram_mask,
    repetition_metrics,
    seq_rep_n,
)


def test_a_b_c_d_repeated_has_only_four_distinct_4grams() -> None:
    tokens = [1, 2, 3, 4] * 25  # "a b c d" x25: 97 4-grams, of which 4 are distinct
    assert seq_rep_n(tokens, 4) == pytest.approx(1 - 4 / 97)
    assert distinct_1(tokens) == pytest.approx(4 / 100)


def test_sequence_with_no_repeated_4gram_scores_zero() -> None:
    tokens = list(range(50))
    metrics = repetition_metrics(tokens, "x")
    assert metrics.rep4 == 0.0
    assert metrics.distinct1 == 1.0
    assert metrics.unique_tokens == 50


def test_one_repeated_4gram_among_ten() -> None:
    # 1 2 3 4 1 2 3 4 5 6 7 8 9: 10 4-grams, (1,2,3,4) twice -> 9 distinct.
    tokens = [1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert seq_rep_n(tokens, 4) == pytest.approx(0.1)


def test_too_short_for_a_4gram_is_not_repetitive() -> None:
    assert seq_rep_n([7, 7, 7], 4) == 0.0


def test_distinct_1_and_unique_tokens() -> None:
    metrics = repetition_metrics([5, 5, 6, 6], "aabb")
    assert metrics.distinct1 == 0.5
    assert metrics.unique_tokens == 2


def test_compression_ratio_is_raw_over_zlib_bytes() -> None:
    text = "T-2 and the " * 100  # 1200 bytes; zlib at level 9 makes 31 of them (other builds: a few more)
    assert compression_ratio(text) == pytest.approx(1200 / len(zlib.compress(text.encode(), 9)))
    assert 1200 / 40 < compression_ratio(text) < 1200 / 25
    assert compression_ratio("") == 1.0
    assert compression_ratio(text) > 10 > compression_ratio("The quick brown fox jumps over the lazy dog.")


def test_repeated_ngram_mask_marks_tokens_inside_repeats() -> None:
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 4]
    assert repeated_ngram_mask(tokens, 4) == [True] * 4 + [False] + [True] * 4


def test_collapse_needs_patience_iterations_in_a_row_at_or_above_threshold() -> None:
    detector = CollapseDetector(threshold=0.9, patience=3)
    verdicts = [detector.update(r) for r in [0.95, 0.9, 0.5, 0.95, 0.91, 0.92, 0.99]]
    assert verdicts == [False, False, False, False, False, True, True]
    exactly = CollapseDetector(threshold=0.75, patience=2)  # 0.75 is exact in binary: "at" means at
    assert [exactly.update(r) for r in [0.75, 0.75]] == [False, True]


@pytest.mark.parametrize(
    ("rep4", "shown"),
    [
        (0.8985, "0.898"),
        (0.8999999, "0.899"),
        (0.9, "0.900"),
        (0.57, "0.570"),
        (1.0, "1.000"),
        (0.0, "0.000"),
    ],
)
def test_rep4_is_shown_rounded_down_so_a_value_under_the_threshold_never_reads_as_reaching_it(
    rep4: float, shown: str
) -> None:
    assert format_rep4(rep4) == shown
    assert (float(shown) >= 0.9) == (rep4 >= 0.9)


@pytest.mark.parametrize(
    ("value", "shown"), [(float("nan"), "nan"), (float("inf"), "inf"), (1e306, "1e+306")]
)
def test_a_rep4_no_run_writes_is_still_printed(value: float, shown: str) -> None:
    """A hand-edited metrics line may hold anything; printing it must not raise (OverflowError)."""
    assert format_rep4(value) == shown


@pytest.mark.parametrize(
    ("rate", "shown"),
    [(2.0, "2.00 it/s"), (1.0, "1.00 it/s"), (0.5, "2 s/it"), (0.004, "250 s/it"), (1 / 21.4, "21.4 s/it"),
     (None, "– it/s"), (0.0, "– it/s"), (math.inf, "– it/s")],
)  # fmt: skip
def test_format_rate_gives_seconds_an_iteration_below_one_a_second(rate: float | None, shown: str) -> None:
    """A large model on the CPU read "0.00 it/s"."""
    assert format_rate(rate) == shown
