"""What the window's prefixes would cost if they ran batched: one forward over J windows of 99 rows.

    python benchmarks/prefix_batch.py --models gpt2,gpt2-medium --windows 1,2,4,8,16,32,64

Rows 0..99-j of the window that samples token c+j+1 hold tokens that are all
known once token c is: causal attention keeps them blind to the rows after
them, so they could run j tokens ahead, batched with the other windows'
prefixes, as keys and values for a cache. Only the rows holding tokens drawn
since (j of them) would then wait on the sampling. This script times the
batched part alone: the fast path's forward (``GPT2Weights.hidden``, bf16,
by CUDA graph replay) over J random windows of 99 tokens, per launch and per
window. RESULTS.md (thirteenth session) sets these figures against the
one-row chain the rest of the scheme would need.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_iteration import VOCAB, build_model
from timing import graph_time

from collapse_tui.fast.gpt2 import GPT2Weights

PREFIX_ROWS = 99  # the window's rows but its last


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2,gpt2-medium")
    parser.add_argument("--windows", default="1,2,4,8,16,32,64", help="batch sizes J to time")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: forward of J windows of {PREFIX_ROWS} rows, bf16, graph replay")
    print("| model | J | µs a launch | µs a window |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.models.split(","):
        weights = GPT2Weights(build_model(name), torch.bfloat16)
        for count in (int(j) for j in args.windows.split(",")):
            micros = prefix_micros(weights, count)
            print(f"| {name} | {count} | {micros:.1f} | {micros / count:.1f} |")
        del weights
        torch.cuda.empty_cache()


def prefix_micros(weights: GPT2Weights, count: int) -> float:
    """Microseconds a graph replay of the forward over ``count`` random windows of PREFIX_ROWS tokens."""
    tokens = torch.randint(0, VOCAB, (count, PREFIX_ROWS), device="cuda")
    with torch.no_grad():
        return graph_time([lambda: weights.hidden(tokens)])


if __name__ == "__main__":
    main()
