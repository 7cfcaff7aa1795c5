"""Repetition metrics and the collapse rule (DESIGN section 2).

Pure functions of token ids and text, so they can be checked against values
worked out by hand and reused by every front end.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def seq_rep_n(tokens: Sequence[int], n: int = 4) -> float:
    """seq-rep-n of Welleck et al. 2020: 1 - |unique n-grams| / |n-grams|.

    0 for text with no repeated n-gram, close to 1 for text that loops. A
    sequence too short to hold an n-gram has nothing repeated: 0.
    """
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_1(tokens: Sequence[int]) -> float:
    """Unique tokens over tokens: the vocabulary's share of the sample."""
    return len(set(tokens)) / len(tokens) if tokens else 0.0


def compression_ratio(text: str) -> float:
    """Raw bytes over zlib-compressed bytes: repetitive text compresses well."""
    raw = text.encode("utf-8")
    if not raw:
        return 1.0
    return len(raw) / len(zlib.compress(raw, 9))


@dataclass(frozen=True)
class RepetitionMetrics:
    rep4: float
    distinct1: float
    unique_tokens: int
    compression_ratio: float


def repetition_metrics(tokens: Sequence[int], text: str) -> RepetitionMetrics:
    """All the repetition numbers the run records for one generated sample."""
    return RepetitionMetrics(
        rep4=seq_rep_n(tokens, 4),
        distinct1=distinct_1(tokens),
        unique_tokens=len(set(tokens)),
        compression_ratio=compression_ratio(text),
    )


def repeated_ngram_mask(tokens: Sequence[int], n: int = 4) -> list[bool]:
    """For each token, whether it lies inside an n-gram that occurs more than once.

    The TUI uses it to highlight the loops in the latest sample.
    """
    grams = ngrams(tokens, n)
    counts = Counter(grams)
    mask = [False] * len(tokens)
    for start, gram in enumerate(grams):
        if counts[gram] > 1:
            for i in range(start, start + n):
                mask[i] = True
    return mask


def format_rep4(value: float | None) -> str:
    """rep4 to three decimals, rounded down, wherever it is printed ("–" before there is one).

    Why down: the collapse rule compares the exact value with the threshold,
    and a value just under it (0.8985 against 0.9) rounded to the nearest
    would read as reaching it, three iterations "at 0.90" and no collapse.
    (The 1e-9 keeps an exact 0.57, stored as 0.5699999…, at 0.570.)
    """
    if value is None:
        return "–"
    if not math.isfinite(value) or abs(value) >= 1e6:  # a hand-edited line's: no rep4 is outside [0, 1]
        return f"{value:.3g}"
    return f"{math.floor(value * 1000 + 1e-9) / 1000:.3f}"


def format_rate(rate: float | None) -> str:
    """Iterations a second, or seconds an iteration below one a second (as tqdm does).

    A large model on the CPU takes minutes an iteration: "0.00 it/s" would
    say nothing, "250 s/it" says what to expect.
    """
    if rate is None or not math.isfinite(rate) or rate <= 0:
        return "– it/s"
    return f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.3g} s/it"


class CollapseDetector:
    """The collapse rule: rep4 at or above ``threshold`` for ``patience`` iterations in a row."""

    def __init__(self, threshold: float = 0.9, patience: int = 3, streak: int = 0) -> None:
        self.threshold = threshold
        self.patience = patience
        #: How many iterations in a row have been at or above the threshold.
        self.streak = streak

    def update(self, rep4: float) -> bool:
        """Feed one iteration's rep4; return whether the output has collapsed."""
        self.streak = self.streak + 1 if rep4 >= self.threshold else 0
        return self.streak >= self.patience
