"""Experiment: torch.compile of the per-token window forward, captured in a manual CUDA graph.

    python benchmarks/try_compile.py --model gpt2-medium --block 100

Compiles the plain-torch window forward (no hand-written Triton, no cuBLASLt
epilogue: inductor does its own fusions) with mode
``max-autotune-no-cudagraphs`` and fixed shapes, then compares per-forward
time, inside a graph of 32 forwards, with the fast path's own forward. Prints
the compile time, since it would be paid at the start of every run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_iteration import build_model
from timing import graph_time

from collapse_tui.fast import FastGPT2Inference


def per_forward_ms(fn, tokens: torch.Tensor, count: int = 32) -> float:
    """Milliseconds per forward, ``count`` forwards to a graph."""
    return graph_time([lambda: fn(tokens)] * count) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2-medium")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--mode", default="max-autotune-no-cudagraphs")
    args = parser.parse_args()
    model = build_model(args.model)
    fast = FastGPT2Inference(model, args.block, 1.0, 200)
    weights = fast.weights
    tokens = torch.randint(0, 50257, (1, args.block), device="cuda")

    def window(t: torch.Tensor) -> torch.Tensor:
        return weights.logits(weights.hidden(t)[0, -1:])

    with torch.no_grad():
        ours = per_forward_ms(window, tokens)
        reference = window(tokens).float()
        weights.use_triton = weights.use_skinny = weights.skinny_lm_head = weights.fused_gelu = False
        plain = per_forward_ms(window, tokens)
        compiled = torch.compile(window, mode=args.mode, fullgraph=True, dynamic=False)
        start = time.perf_counter()
        out = compiled(tokens).float()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        err = float((out - reference).norm() / reference.norm())
        inductor = per_forward_ms(compiled, tokens)
    print(
        f"{args.model} block {args.block}: fast path {ours:.3f} ms, plain torch {plain:.3f} ms, "
        f"compiled ({args.mode}) {inductor:.3f} ms per forward; compile {compile_s:.1f} s; "
        f"relative difference {err:.1e}"
    )


if __name__ == "__main__":
    main()
