"""The top-k exponential race (collapse_tui/fast/topk_race.py): its Triton kernels and its torch form.

The kernels run here under Triton's interpreter (machines without a GPU,
tests/conftest.py); tests/test_fast_gpu.py runs them on a GPU. Both forms
must pick, for the same draws, the token ``sampling.sample_next`` picks.
"""

from __future__ import annotations

import os

import pytest
import torch

from collapse_tui.fast.topk_race import Append, RaceBuffers, race_winner, sample_token
from collapse_tui.sampling import sample_next

try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True

interpreted = pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs under Triton's interpreter (machines without a GPU); on GPUs see test_fast_gpu.py",
)


def logits_row(n: int, ties: bool, seed: int) -> torch.Tensor:
    """bf16 logits [1, n]; with ``ties`` only six distinct values, so the k-th largest is shared."""
    gen = torch.Generator().manual_seed(seed)
    values = (
        torch.randint(-3, 3, (1, n), generator=gen).float() if ties else torch.randn(1, n, generator=gen) * 3
    )
    return values.to(torch.bfloat16)


def kth_largest(logits: torch.Tensor, k: int) -> float:
    return float(logits.float().sort(descending=True).values[0, k - 1])


@pytest.mark.parametrize("n", [97, 2048, 2049, 50257])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_torch_race_picks_the_token_sample_next_picks(n: int, ties: bool) -> None:
    logits = logits_row(n, ties, seed=n)
    for k in (None, 1, 7, n - 1, n):
        for temperature in (1.0, 0.6):
            draws = torch.empty(1, n).exponential_(generator=torch.Generator().manual_seed(k or 0))
            ours = race_winner(logits, draws, temperature, k, use_triton=False)
            theirs = sample_next(logits, temperature, k, torch.Generator().manual_seed(k or 0))
            assert ours.tolist() == theirs.tolist()


def test_sample_token_consumes_the_draws_sample_next_consumes() -> None:
    logits = logits_row(500, ties=False, seed=1)
    ours_gen, theirs_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    ours = [int(sample_token(logits, 1.0, 50, ours_gen)) for _ in range(20)]
    theirs = [int(sample_next(logits, 1.0, 50, theirs_gen)) for _ in range(20)]
    assert ours == theirs
    assert len(set(ours)) > 5


@interpreted
@pytest.mark.parametrize("n", [97, 2048, 2049, 5000])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_race_picks_the_torch_race_token(n: int, ties: bool, dtype: torch.dtype) -> None:
    logits = logits_row(n, ties, seed=n + 1).to(dtype)
    for k in (None, 1, 5, 200, n - 1, n):
        draws = torch.empty(1, n).exponential_(generator=torch.Generator().manual_seed(n))
        for temperature in (1.0, 0.7):
            ours = race_winner(logits, draws, temperature, k, use_triton=True)
            theirs = race_winner(logits, draws, temperature, k, use_triton=False)
            assert ours.tolist() == theirs.tolist(), (k, temperature)


@interpreted
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_triton_race_keeps_exactly_the_logits_at_or_above_the_kth_largest(ties: bool) -> None:
    """A draw near zero makes a logit win if it takes part: the k-th largest must, the next below must not."""
    n, k = 3000, 200
    logits = logits_row(n, ties, seed=5)
    kth = kth_largest(logits, k)
    values = logits[0].float()
    at_kth = int((values == kth).nonzero()[0])
    below = values < kth
    just_below = int(torch.where(below, values, float("-inf")).argmax())
    for favourite, should_win in ((at_kth, True), (just_below, False)):
        draws = torch.ones(1, n)
        draws[0, favourite] = 1e-30
        token = int(race_winner(logits, draws, 1.0, k, use_triton=True))
        assert (token == favourite) is should_win
        assert values[token] >= kth


@interpreted
def test_negative_zero_ties_with_a_zero_kth_largest() -> None:
    """-0 equals +0: when the k-th largest logit is 0, every -0 logit takes part too, as in torch."""
    logits = torch.tensor([[3.0] * 50 + [0.0] * 70 + [-0.0] * 80], dtype=torch.bfloat16)
    draws = torch.ones(1, 200)
    draws[0, 150] = 1e-30  # a -0 logit wins if it takes part
    ours = race_winner(logits, draws, 1.0, 100, use_triton=True)
    theirs = race_winner(logits, draws, 1.0, 100, use_triton=False)
    assert ours.tolist() == theirs.tolist() == [150]


def _race_three_times(use_triton: bool) -> tuple[list[int], list[int], torch.Tensor, RaceBuffers]:
    """Three races into one sequence through one set of buffers; and each race's token when raced alone."""
    n = 3000
    buffers = RaceBuffers(n, torch.device("cpu"))
    seq, counter = torch.full((10,), -1, dtype=torch.long), torch.tensor([3])
    append = Append(seq, counter, offset=1)  # the counter holds the position fed, as a KV-cache step's
    appended, alone = [], []
    for seed in range(3):
        logits = logits_row(n, ties=False, seed=seed)
        draws = torch.empty(1, n).exponential_(generator=torch.Generator().manual_seed(seed))
        token = race_winner(logits, draws, 1.0, 200, use_triton=use_triton, buffers=buffers, append=append)
        appended.append(int(token))
        alone.append(int(race_winner(logits, draws, 1.0, 200, use_triton=use_triton)))
    assert counter.tolist() == [6]
    return appended, alone, seq, buffers


def test_the_torch_race_appends_its_token_after_the_counter() -> None:
    appended, alone, seq, _ = _race_three_times(use_triton=False)
    assert appended == alone
    assert seq.tolist() == [-1] * 4 + alone + [-1] * 3


@interpreted
def test_the_triton_race_appends_its_token_and_leaves_its_state_zeroed() -> None:
    """Buffers reused race after race: the last block zeroes the histograms, or the next race would count twice."""
    appended, alone, seq, buffers = _race_three_times(use_triton=True)
    assert appended == alone
    assert len(set(alone)) > 1
    assert seq.tolist() == [-1] * 4 + alone + [-1] * 3
    assert not buffers.state.any()
