"""A Triton matrix product for few rows (M ≤ 128): ``x @ W.T`` with bias, tanh GELU or split-K partials.

Why: a generated token multiplies a window of at most ``block`` rows (100 in
the paper) by every weight matrix. At that size cuBLAS picks tiles that give
a few dozen CTAs, each with a long K loop, and streams the weights at 1–2
TB/s (benchmarks/RESULTS.md). Here the grid is spread over N in narrow tiles
and, for the two products whose output only feeds the residual stream (the
attention projection and the MLP's down-projection), also over K: each split
writes fp32 partial sums ``[splits, M, N]`` that ``add_layernorm`` adds into
the residual in a fixed order (deterministic, unlike atomic adds), so the
split costs no extra kernel.

The tile shapes come from ``benchmarks/bench_gemm.py`` (a sweep on the
device); shapes it has not seen get a rule of thumb. Only for bf16/fp16: an
fp32 ``tl.dot`` would run in tf32 and change the fp32 path's results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

#: Most rows one product may have to take this path (one or a few row tiles).
MAX_ROWS = 128


class Tiles(NamedTuple):
    """One launch shape: output columns per CTA, K step, K splits, warps, pipeline stages."""

    block_n: int
    block_k: int
    splits: int
    warps: int = 4
    stages: int = 3


#: Measured best tiles per (row tile, N, K, partial allowed), from benchmarks/bench_gemm.py.
#: H200, 2026-11-27: split-K wins 15–60% on the residual products; with a bias or GELU epilogue
#: (no split) cuBLAS(Lt) stays faster, so ``GPT2Weights`` sends only the split-K products and lm_head here.
TUNED: dict[tuple[int, int, int, bool], Tiles] = {
    (128, 1024, 1024, True): Tiles(32, 64, 4, 4, 4),  # 3.95 us vs cuBLAS 4.76
    (128, 1024, 4096, True): Tiles(64, 64, 8, 4, 4),  # 6.35 us vs cuBLAS 7.83
    (128, 768, 768, True): Tiles(32, 64, 4, 4, 4),  # 3.09 us vs cuBLAS 3.55
    (128, 768, 3072, True): Tiles(64, 64, 8, 4, 4),  # 5.30 us vs cuBLAS 7.18
    (16, 1024, 1024, True): Tiles(64, 64, 8, 4, 4),  # 2.94 us vs cuBLAS 7.81
    (16, 1024, 4096, True): Tiles(32, 128, 8, 4, 3),  # 4.87 us vs cuBLAS 7.07
    (16, 768, 768, True): Tiles(32, 64, 4, 4, 4),  # 2.24 us vs cuBLAS 3.98
    (16, 768, 3072, True): Tiles(32, 128, 8, 4, 3),  # 4.08 us vs cuBLAS 6.59
    (16, 50257, 1024, False): Tiles(128, 64, 1, 8, 4),  # 27.1 us vs cuBLAS 36.4
    (16, 50257, 768, False): Tiles(64, 64, 1, 4, 4),  # 21.5 us vs cuBLAS 30.4
}


def row_tile(rows: int) -> int:
    """Rows per CTA: the smallest power of two from 16 (``tl.dot``'s minimum) that holds ``rows``."""
    return max(16, 1 << (rows - 1).bit_length()) if rows <= MAX_ROWS else MAX_ROWS


def default_tiles(rows: int, n: int, k: int, partial: bool) -> Tiles:
    """A rule of thumb: about one CTA per SM, over N first, then over K where partials are allowed."""
    block_n = 32 if n >= 2048 else 64
    block_k = 128 if k % 128 == 0 else 64
    splits = 1
    if partial:
        while (n // block_n) * splits * 2 <= 160 and k % (splits * 2 * block_k) == 0:
            splits *= 2
    return Tiles(block_n, block_k, splits)


def pick_tiles(rows: int, n: int, k: int, partial: bool) -> Tiles:
    return TUNED.get((row_tile(rows), n, k, partial)) or default_tiles(rows, n, k, partial)


@functools.cache
def _kernel() -> Callable[..., None] | None:
    """Build the Triton kernel once; ``None`` when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, K_SPLIT,
               HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_s * K_SPLIT + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :]
        row_ok = rows[:, None] < M
        col_ok = cols[:, None] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K_SPLIT, BLOCK_K):
            x = tl.load(x_ptrs, mask=row_ok, other=0.0)
            w = tl.load(w_ptrs, mask=col_ok, other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out_cols = cols[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + out_cols, mask=out_cols < N, other=0.0).to(tl.float32)
        if GELU:  # tanh GELU, 0.5 x (1 + tanh u) = x sigmoid(2u)
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(2.0 * inner)
        out_ptrs = out_ptr + (pid_s.to(tl.int64) * M + rows[:, None]) * N + out_cols
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (out_cols < N))

    return kernel


def available() -> bool:
    return _kernel() is not None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``skinny_linear`` takes this product: CUDA, half precision, few rows."""
    rows = x.numel() // x.size(-1)
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and rows <= MAX_ROWS
        and x.size(-1) % 64 == 0
        and available()
    )


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gelu: bool = False,
    partial: bool = False,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """``x @ weight.T (+ bias)``, tanh-GELU'd when ``gelu``, for ``x`` [..., K], ``weight`` [N, K].

    Returns ``[..., N]`` in ``x``'s dtype, or with ``partial`` (no bias, no
    GELU) fp32 partial sums ``[splits, ..., N]`` whose sum over the first
    dimension is the product: ``add_layernorm`` takes either. Check ``usable``
    first.
    """
    kernel = _kernel()
    assert kernel is not None
    k, n = x.size(-1), weight.size(0)
    flat = x.reshape(-1, k).contiguous()
    rows = flat.size(0)
    tiles = tiles or pick_tiles(rows, n, k, partial and bias is None and not gelu)
    if k % (tiles.splits * tiles.block_k) != 0:
        tiles = Tiles(tiles.block_n, 64, 1, tiles.warps, tiles.stages)
    block_m = row_tile(rows)
    if tiles.splits > 1:
        out = torch.empty((tiles.splits, rows, n), dtype=torch.float32, device=x.device)
        shape = (tiles.splits, *x.shape[:-1], n)
    else:
        out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
        shape = (*x.shape[:-1], n)
    grid = (-(-n // tiles.block_n), tiles.splits, -(-rows // block_m))
    kernel[grid](
        flat, weight, weight if bias is None else bias, out, rows, n, k, k // tiles.splits,
        HAS_BIAS=bias is not None, GELU=gelu, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out.view(shape)
