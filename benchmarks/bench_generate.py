"""Generation alone, one variant of the fast path at a time: what each change buys.

    python benchmarks/bench_generate.py --models gpt2,gpt2-medium --blocks 100,1024

Variants: one step per graph replay (the first version), several steps per
replay, and the Triton skinny products (without and with ``lm_head``). Each
is timed as the median of ``--repeats`` generations of 1024 tokens (1023 at
full context) after a short warm-up generation that captures the graphs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_iteration import build_model, timed

from collapse_tui.fast import FastGPT2Inference
from collapse_tui.fast.persistent import Plan

#: label -> (tokens per replay, Triton products, Triton lm_head, persistent forward)
VARIANTS = {
    "1 step per replay, cuBLAS": (1, False, False, False),
    "8 steps per replay, cuBLAS": (8, False, False, False),
    "32 steps per replay, cuBLAS": (32, False, False, False),
    "32 steps, Triton products": (32, True, False, False),
    "32 steps, Triton products + lm_head": (32, True, True, False),
    "persistent forward": (32, True, True, True),
}


def time_variant(
    model: torch.nn.Module, block: int, tokens: int, variant: tuple, repeats: int, plan: Plan | None = None
) -> float:
    per_replay, products, lm_head, one_launch = variant
    fast = FastGPT2Inference(
        model, block, 1.0, 200, tokens_per_replay=per_replay, use_persistent=one_launch, persistent_plan=plan
    )
    fast.weights.use_skinny &= products
    fast.weights.skinny_lm_head &= lm_head
    gen = torch.Generator(device="cuda").manual_seed(0)
    fast.generate([50256], 40, gen)
    return statistics.median(timed(lambda: fast.generate([50256], tokens, gen))[0] for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2,gpt2-medium")
    parser.add_argument("--blocks", default="100,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=";".join(VARIANTS), help="labels, separated by ';'")
    args = parser.parse_args()
    labels = args.variants.split(";")
    print(torch.cuda.get_device_name())
    lines = ["| model | block | " + " | ".join(labels) + " |", "| --- | ---: |" + " ---: |" * len(labels)]
    for name in args.models.split(","):
        model = build_model(name)
        for block in (int(b) for b in args.blocks.split(",")):
            tokens = 1024 if block < 1024 else 1023
            cells = []
            for label in labels:
                try:
                    cells.append(f"{time_variant(model, block, tokens, VARIANTS[label], args.repeats):.3f}")
                except Exception as error:  # report and go on with the other variants
                    print(f"{name} {block} {label}: {type(error).__name__}: {error}", flush=True)
                    cells.append("failed")
            lines.append(f"| {name} | {block} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
