"""Sweep the Triton skinny product's tiles against cuBLAS for the per-token shapes of GPT-2 models.

    python benchmarks/bench_gemm.py --widths 768,1024 --rows 1,100

For each (rows, N, K) that one generated token multiplies (qkv, attention
projection, MLP up and down, and lm_head), times cuBLAS as the fast path
called it before (``F.linear`` with the bias; cuBLASLt's GELU epilogue for
the up-projection) and every candidate tile shape, checks each against an
fp32 product of the same bf16 operands, and prints the best tiles as the
``skinny.TUNED`` entries to paste. Timing: one CUDA graph over ``--layers``
distinct weight copies (as many as the model has layers), so the weights
come from device memory as in a real step, not from L2.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import graph_time

from collapse_tui.fast import skinny
from collapse_tui.fast.kernels import linear_gelu


def candidates(k: int, partial: bool) -> list[skinny.Tiles]:
    out = []
    splits = (1, 2, 4, 8) if partial else (1,)
    for block_n, block_k, split in itertools.product((32, 64, 128), (64, 128), splits):
        if k % (split * block_k) == 0:
            stages = 4 if block_k == 64 else 3
            out.append(skinny.Tiles(block_n, block_k, split, 8 if block_n == 128 else 4, stages))
    return out


def sweep(rows: int, n: int, k: int, kind: str, layers: int) -> tuple[float, skinny.Tiles, float, float]:
    """(cuBLAS µs, best tiles, their µs, their relative error) for one product shape."""
    gen = torch.Generator(device="cuda").manual_seed(rows * n + k)
    bf16 = torch.bfloat16
    x = torch.randn(rows, k, device="cuda", dtype=bf16, generator=gen)
    ws = [torch.randn(n, k, device="cuda", dtype=bf16, generator=gen) / k**0.5 for _ in range(layers)]
    bias = torch.randn(n, device="cuda", dtype=bf16, generator=gen) if kind in ("bias", "gelu") else None
    partial = kind == "partial"
    gelu = kind == "gelu"

    def reference(w: torch.Tensor) -> torch.Tensor:
        out = x.float() @ w.float().T + (0 if bias is None else bias.float())
        return F.gelu(out, approximate="tanh") if gelu else out

    if gelu:
        cublas = [lambda w=w: linear_gelu(x, w, bias, True) for w in ws]  # type: ignore[arg-type]
    else:
        cublas = [lambda w=w: F.linear(x, w, bias) for w in ws]
    t_cublas = graph_time(cublas)
    ref = reference(ws[0])
    best: tuple[float, skinny.Tiles, float] | None = None
    for tiles in candidates(k, partial):
        try:
            out = skinny.skinny_linear(x, ws[0], bias, gelu=gelu, partial=partial, tiles=tiles)
        except Exception as error:  # a tile shape Triton cannot build: skip it
            print(f"  {tiles}: {type(error).__name__}", flush=True)
            continue
        out = out.float().sum(0) if out.dim() == 3 else out.float()
        err = float((out - ref).norm() / ref.norm())
        if not err < 1e-2:
            print(f"  {tiles}: WRONG, relative error {err:.2e}", flush=True)
            continue
        fns = [
            lambda w=w, t=tiles: skinny.skinny_linear(x, w, bias, gelu=gelu, partial=partial, tiles=t)
            for w in ws
        ]
        t = graph_time(fns)
        if best is None or t < best[0]:
            best = (t, tiles, err)
    assert best is not None
    return t_cublas, best[1], best[0], best[2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", default="768,1024")
    parser.add_argument("--rows", default="1,100")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=50257)
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    lines = ["| rows | N | K | kind | cuBLAS µs | Triton µs | GB/s Triton | tiles | rel err |"]
    lines.append("| ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |")
    tuned = []
    for width in (int(w) for w in args.widths.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            shapes = [
                (3 * width, width, "bias"),
                (width, width, "partial"),
                (4 * width, width, "gelu"),
                (width, 4 * width, "partial"),
            ]
            if rows == 1:
                shapes.append((args.vocab, width, "plain"))
            for n, k, kind in shapes:
                layers = 4 if kind == "plain" else args.layers
                t_cublas, tiles, t, err = sweep(rows, n, k, kind, layers)
                gbs = n * k * 2 / (t * 1e-6) / 1e9
                line = (
                    f"| {rows} | {n} | {k} | {kind} | {t_cublas:.2f} | {t:.2f} | {gbs:.0f} "
                    f"| {tuple(tiles)} | {err:.1e} |"
                )
                print(line, flush=True)
                lines.append(line)
                if t < t_cublas:
                    key = (skinny.row_tile(rows), n, k, kind == "partial")
                    tuned.append(f"    {key}: Tiles{tuple(tiles)},  # {t:.2f} us vs cuBLAS {t_cublas:.2f}")
    print("\n".join(lines))
    print("TUNED = {\n" + "\n".join(tuned) + "\n}")


if __name__ == "__main__":
    main()
