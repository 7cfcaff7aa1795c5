"""Where a token's time goes inside the persistent kernels: the SM cycles of each step of a layer.

    python benchmarks/trace_persistent.py --models gpt2-medium,gpt2 --rows 100 --position 511

Builds both kernels with ``TRACE``: every CTA adds up the SM cycles
(``%clock64``) of each step, over all layers. Printed per layer, in µs at
the SM clock given, as the mean and the largest over the CTAs, next to the
launch's own time by graph replay. A stage's time includes its waits on the
dependency flags it needs; a barrier's is the wait for the slowest CTA.

- window (``forward_kernel``, ``--rows`` tokens): qkv, attention,
  projection, barrier, residual + ln_2, barrier, MLP up, MLP down, barrier,
  residual + ln_1, barrier;
- cached token (``decode_kernel`` at ``--position``): ln_1 + qkv, attention
  chunks, projection, ln_2 + MLP up, MLP down, each with what follows it up
  to the next stage (the grid barrier after the projection and after MLP
  down; after the others, loading the next product's first tile).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_iteration import build_model
from timing import graph_time

from collapse_tui.fast.gpt2 import GPT2Weights
from collapse_tui.fast.persistent import PersistentForward

#: (slot, label) of each step, in the order a layer runs them
WINDOW_STEPS = (
    (0, "qkv (waiting for ln_1's rows included)"),
    (1, "attention (flag waits included)"),
    (2, "projection (flag waits included)"),
    (3, "barrier"),
    (4, "residual + ln_2"),
    (6, "MLP up (waiting for ln_2's rows included)"),
    (7, "MLP down (flag waits included)"),
    (8, "barrier"),
    (9, "residual + ln_1"),
)
DECODE_STEPS = (
    (0, "ln_1 + qkv"),
    (5, "next tile's loads"),
    (1, "attention chunks (flag waits included)"),
    (2, "projection (flag waits included)"),
    (7, "barrier"),
    (3, "ln_2 + MLP up"),
    (8, "next tile's loads"),
    (4, "MLP down (flag waits included)"),
    (9, "barrier"),
)


def trace(forward: PersistentForward, inputs: tuple, steps: tuple, layers: int, ghz: float) -> None:
    """Time the launch plain and traced, then print the per-layer µs of every step."""
    plain = graph_time([lambda: forward.run(*inputs)])
    forward.trace = True
    traced = graph_time([lambda: forward.run(*inputs)])
    forward.trace_cycles.zero_()
    forward.run(*inputs)
    torch.cuda.synchronize()
    forward.trace = False
    micros = forward.trace_cycles.double() / (ghz * 1e3) / layers
    print(f"{plain:.1f} µs a launch ({traced:.1f} traced), {layers} layers; µs a layer:")
    print("| step | mean | max |")
    print("| --- | ---: | ---: |")
    for slot, label in steps:
        print(f"| {label} | {micros[:, slot].mean():.2f} | {micros[:, slot].max():.2f} |")
    print(f"| all | {micros[:, :15].sum(dim=1).mean():.1f} (CTA mean) | |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2-medium,gpt2")
    parser.add_argument("--rows", type=int, default=100, help="window rows (0: skip the window)")
    parser.add_argument("--position", type=int, default=511, help="cached token's position (-1: skip)")
    parser.add_argument("--ghz", type=float, default=1.98, help="SM clock used to turn cycles into µs")
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    for name in args.models.split(","):
        weights = GPT2Weights(build_model(name), torch.bfloat16)
        layers = len(weights.layers)
        if args.rows > 0:
            print(f"\n{name}, window of {args.rows} rows: ", end="")
            window = torch.randint(0, 50257, (args.rows,), device="cuda")
            trace(PersistentForward(weights, args.rows), (window,), WINDOW_STEPS, layers, args.ghz)
        if args.position >= 0:
            print(f"\n{name}, cached token at {args.position}: ", end="")
            forward = PersistentForward(weights, 1, cache=weights.new_kv_cache(1024))
            inputs = (
                torch.randint(0, 50257, (1,), device="cuda"),
                torch.tensor([args.position], device="cuda"),
            )
            trace(forward, inputs, DECODE_STEPS, layers, args.ghz)


if __name__ == "__main__":
    main()
