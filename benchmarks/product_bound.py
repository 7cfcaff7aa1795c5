"""What bounds a product of the window kernel: its activation reads, its weight reads, or neither?

    python benchmarks/product_bound.py

Each product of ``persistent_kernel.forward_kernel`` at 100 rows is one
(column tile, K split) item per CTA, whose K loop reads a [100, BK] slice
of the activations and a [BN, BK] slice of the weights per step: every CTA
reads the whole activation slice of its split, ~3× the bytes of its
weights. This times the same item loop (``gemm_stage``'s tiles, warps and
stages), standalone, repeated ``REPEATS`` times in one launch so that the
launch itself drops out, in three variants:

- ``both``: as in the kernel;
- ``weights``: the activation tile loaded once before the K loop and reused
  (the bytes a product would read if the CTAs of a cluster shared the
  activations, as TMA multicast would let them);
- ``activations``: the weight tile loaded once and reused.

Everything is L2-resident after the first repeat, as in the kernel, whose
weights are prefetched to L2 a stage ahead. cuBLAS on the same shape is the
reference (one launch each, so its launch is included). Prints a markdown
table of µs per product, for each ``--configs`` entry (tile shapes, stages,
warps, K splits).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import graph_time

REPEATS = 64
#: gpt2-medium's four products at 100 rows: (name, N, K, K splits), as the default plan runs them
PRODUCTS = (
    ("qkv", 3072, 1024, 1),
    ("projection", 1024, 1024, 4),
    ("MLP up", 4096, 1024, 1),
    ("MLP down", 1024, 4096, 4),
)
VARIANTS = {"both": 0, "weights": 1, "activations": 2}


@triton.jit
def product_kernel(x_ptr, w_ptr, out_ptr, M, N: tl.constexpr, K: tl.constexpr, SPLITS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, REUSE: tl.constexpr,
                   REPEATS: tl.constexpr):  # fmt: skip
    """``gemm_stage``'s item loop, ``REPEATS`` times; ``REUSE`` 1 keeps the first activation tile, 2 the first
    weight tile."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    N_TILES: tl.constexpr = N // BN
    KS: tl.constexpr = K // SPLITS
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows[:, None] < M
    for _ in range(REPEATS):
        for item in range(pid, N_TILES * SPLITS, nprog):
            tile = item % N_TILES
            split = item // N_TILES
            cols = tile * BN + tl.arange(0, BN)
            first = split * KS + tl.arange(0, BK)
            acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
            x = tl.load(
                x_ptr + rows[:, None] * K + first[None, :], mask=row_ok, other=0.0, cache_modifier=".cg"
            )
            w = tl.load(w_ptr + cols[:, None] * K + first[None, :])
            for step in range(0, KS // BK):  # addresses from the step's offsets, as in gemm_stage
                ks = split * KS + step * BK + tl.arange(0, BK)
                if REUSE != 1:
                    x = tl.load(
                        x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok, other=0.0, cache_modifier=".cg"
                    )
                if REUSE != 2:
                    w = tl.load(w_ptr + cols[:, None] * K + ks[None, :])
                acc = tl.dot(x, tl.trans(w), acc)
            tl.store(out_ptr + (split * BLOCK_M + rows[:, None]) * N + cols[None, :], acc, mask=row_ok)


CONFIG_KEYS = {"bn": "block_n", "bk": "block_k", "s": "stages", "w": "warps", "qs": "qkv", "ps": "projection",
               "us": "MLP up", "os": "MLP down"}  # fmt: skip


def parse_config(text: str) -> dict[str, int]:
    """``bn=32,bk=64,...`` over the default plan; ``qs``/``ps``/``us``/``os``: K splits of each product."""
    config = {"block_n": 32, "block_k": 64, "stages": 3, "warps": 8}
    config |= {name: splits for name, _n, _k, splits in PRODUCTS}
    for field in filter(None, text.split(",")):
        key, value = field.split("=")
        config[CONFIG_KEYS[key]] = int(value)
    return config


def time_product(name: str, n: int, k: int, config: dict[str, int], rows: int, grid: int) -> list[float]:
    """µs of one product in each variant (``VARIANTS``) under ``config``."""
    splits = config[name]
    x = torch.randn(128, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(splits, 128, n, device="cuda", dtype=torch.float32)
    cells = []
    for reuse in VARIANTS.values():
        launch = functools.partial(
            product_kernel[(grid,)], x, w, out, rows, n, k, splits, 128, config["block_n"], config["block_k"],
            reuse, REPEATS, num_warps=config["warps"], num_stages=config["stages"],
        )  # fmt: skip
        cells.append(graph_time([launch]) / REPEATS)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument(
        "--configs", default="", help='";"-separated changes to the default plan, e.g. "bk=128;bn=64,s=4"'
    )
    args = parser.parse_args()
    grid = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}; {grid} CTAs; {args.rows} rows; µs a product, mean of {REPEATS} "
          "in one launch (cuBLAS: one launch, its launch included)")  # fmt: skip
    print("| config | product | K steps an item | both | weights only | activations only | cuBLAS |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    cublas = {}  # the reference does not depend on the plan: timed once a product
    for name, n, k, _splits in PRODUCTS:
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        cublas[name] = graph_time([lambda x=x, w=w: x @ w.T])
    for text in args.configs.split(";"):
        config = parse_config(text)
        for name, n, k, _splits in PRODUCTS:
            steps = k // config[name] // config["block_k"]
            try:
                cells = " | ".join(f"{c:.2f}" for c in time_product(name, n, k, config, args.rows, grid))
            except Exception as error:  # report and go on with the other configs
                cells = f"failed: {type(error).__name__}: {str(error)[:100]} | | "
            print(f"| {text or 'default'} | {name} | {steps} | {cells} | {cublas[name]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
