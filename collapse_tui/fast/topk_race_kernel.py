"""The Triton source of the top-k exponential race (see ``topk_race.py``, which launches it).

Sampling with top-k needs the k-th largest logit. ``torch.topk`` finds it in
about a dozen launches (~35 µs for one row of 50,257 on an H200), longer
than the race itself. bf16 logits have only 65,536 distinct values, so the
k-th largest is found exactly by a radix select of two 8-bit digits:

1. ``high_histogram``: every block counts its logits by the high byte of an
   order-preserving 16-bit key; the counts are added into a shared histogram
   with integer atomics (exact, so the result does not depend on the order).
2. ``low_histogram``: every block finds, from that histogram, the high byte
   the k-th largest has, and counts the low bytes of the logits with it.
3. ``race``: every block finds the whole key, scores ``x / T - log E`` for
   the logits at or above it, and keeps its best; the last block to finish
   picks the winner among the blocks' bests.

A module of its own because importing it needs Triton: ``topk_race``
imports it only on first use.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def order_key(x):
    """bf16 values → int32 keys in [0, 65535] that sort like the values (a larger logit, a larger key).

    -0 takes +0's key: the two are equal, and a tie with the k-th largest takes part.
    """
    bits = x.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
    bits = tl.where(bits == -32768, 0, bits)  # -0 (0x8000) as +0
    return tl.where(bits >= 0, bits, bits ^ 0x7FFF) + 32768


@triton.jit
def pick_bin(counts, need):
    """The largest bin whose count together with every larger bin's reaches ``need``; the need left in it.

    ``counts`` [256] are counts per digit, larger digits = larger logits, so
    that bin holds the ``need``-th largest value.
    """
    bins = tl.arange(0, 256)
    at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    chosen = tl.max(tl.where(at_or_above >= need, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > chosen, counts, 0), axis=0)
    return chosen, need - above


@triton.jit
def high_histogram(logit_ptr, state_ptr, n, BLOCK: tl.constexpr):
    """Add this block's counts per high byte of the key into ``state[0:256]``."""
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    key = order_key(tl.load(logit_ptr + offsets, mask=ok, other=0.0))
    counts = tl.histogram(tl.where(ok, key >> 8, 0), 256)
    bins = tl.arange(0, 256)
    counts -= tl.where(bins == 0, BLOCK - tl.sum(ok.to(tl.int32), axis=0), 0)  # padding went to bin 0
    tl.atomic_add(state_ptr + bins, counts, sem="relaxed")


@triton.jit
def low_histogram(logit_ptr, state_ptr, n, k, BLOCK: tl.constexpr):
    """Add this block's counts per low byte, of the keys whose high byte is the k-th largest's, into ``state[256:512]``."""
    pid = tl.program_id(0)
    bins = tl.arange(0, 256)
    high, _ = pick_bin(tl.load(state_ptr + bins), k)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    key = order_key(tl.load(logit_ptr + offsets, mask=ok, other=0.0))
    inside = ok & ((key >> 8) == high)
    counts = tl.histogram(tl.where(inside, key & 255, 0), 256)
    counts -= tl.where(bins == 0, BLOCK - tl.sum(inside.to(tl.int32), axis=0), 0)  # the rest went to bin 0
    tl.atomic_add(state_ptr + 256 + bins, counts, sem="relaxed")


@triton.jit
def race(logit_ptr, draw_ptr, kth_ptr, state_ptr, best_ptr, index_ptr, token_ptr, seq_ptr, counter_ptr, n, k,
         inv_temperature, THRESHOLD: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
         APPEND: tl.constexpr, OFFSET: tl.constexpr):  # fmt: skip
    """``argmax(x / T - log E)`` over the logits at or above the k-th largest, written to ``token_ptr``.

    THRESHOLD 0: no top-k; 1: the k-th largest from the two histograms
    (bf16 logits); 2: the k-th largest value given at ``kth_ptr``. The last
    block zeroes the state for the next race (every block has read it by
    then) and, with ``APPEND``, also writes the token to
    ``seq[counter + OFFSET]`` and adds 1 to ``counter`` (``topk_race.Append``).
    """
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    raw = tl.load(logit_ptr + offsets, mask=ok, other=0.0)
    x = raw.to(tl.float32)
    score = x * inv_temperature - tl.log(tl.load(draw_ptr + offsets, mask=ok, other=1.0))
    keep = ok
    if THRESHOLD == 1:
        bins = tl.arange(0, 256)
        high, need = pick_bin(tl.load(state_ptr + bins), k)
        low, _ = pick_bin(tl.load(state_ptr + 256 + bins), need)
        keep = keep & (order_key(raw) >= high * 256 + low)
    elif THRESHOLD == 2:
        keep = keep & (x >= tl.load(kth_ptr).to(tl.float32))
    score = tl.where(keep, score, float("-inf"))
    tl.store(best_ptr + pid, tl.max(score, axis=0))
    tl.store(index_ptr + pid, pid * BLOCK + tl.argmax(score, axis=0))
    tl.debug_barrier()  # this block's stores are issued before it counts itself done (release)
    finished = tl.atomic_add(state_ptr + 512, 1, sem="acq_rel", scope="gpu")
    if finished == tl.num_programs(0) - 1:  # the last block: every other block's best is visible
        blocks = tl.arange(0, BLOCKS)
        present = blocks < tl.num_programs(0)
        bests = tl.load(best_ptr + blocks, mask=present, other=float("-inf"), cache_modifier=".cg")
        winner = tl.argmax(bests, axis=0)
        token = tl.load(index_ptr + winner, cache_modifier=".cg")
        tl.store(token_ptr, token)
        slots = tl.arange(0, 1024)  # the histograms and the count of finished blocks (topk_race.STATE_SLOTS)
        tl.store(state_ptr + slots, tl.zeros([1024], dtype=tl.int32), mask=slots < 2 * 256 + 1)
        if APPEND:
            count = tl.load(counter_ptr)
            tl.store(seq_ptr + count + OFFSET, token)
            tl.store(counter_ptr, count + 1)
