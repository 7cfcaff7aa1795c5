"""What a generated token costs outside the forward: lm_head and the sampling steps, one by one.

    python benchmarks/bench_sampling.py --widths 1024,768

Each piece is timed by graph replay (``timing.graph_time``) on a random
``[1, vocab]`` row of bf16 logits, the shape every generation step samples
from, with temperature 1 and top-k 200 (DESIGN section 1), so the numbers
add up to the time between the end of one token's forward and the start
of the next.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import graph_time

from collapse_tui.fast import skinny, topk_race

VOCAB = 50257
TOP_K = 200


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", default="1024,768")
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB, device="cuda", dtype=torch.bfloat16) * 3
    draws = torch.empty(1, VOCAB, device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; µs per call")
    pieces = {
        "exponential draws": lambda: draws.exponential_(1.0),
        f"topk({TOP_K}) + amin": lambda: torch.topk(logits, TOP_K, dim=-1, sorted=False).values.amin(dim=-1),
        "sample_token (all of it)": lambda: topk_race.sample_token(logits, 1.0, TOP_K, None),
        "sample_token, no top-k": lambda: topk_race.sample_token(logits, 1.0, None, None),
    }
    for name, fn in pieces.items():
        print(f"{name:32s} {graph_time([fn] * 20):8.2f}")
    for width in (int(w) for w in args.widths.split(",")):
        heads = [torch.randn(VOCAB, width, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        x = torch.randn(1, width, device="cuda", dtype=torch.bfloat16)
        fns = [lambda w=w, x=x: skinny.skinny_linear(x, w) for w in heads]  # distinct weights: from HBM
        print(f"{'lm_head, width ' + str(width):32s} {graph_time(fns):8.2f}")


if __name__ == "__main__":
    main()
