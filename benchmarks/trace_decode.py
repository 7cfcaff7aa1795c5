"""Where a cached token's time goes inside the persistent decode kernel: each stage, and what follows it.

    python benchmarks/trace_decode.py --models gpt2-medium,gpt2 --position 511

Builds the kernel with ``TRACE``: every CTA adds up the SM cycles (``%clock64``)
of each stage (its waits on the dependency flags it needs included) and of
what follows it up to the next stage (the grid barrier after the projection
and after MLP down; after the others, loading the next product's first
tile), over all layers. Printed per layer, in µs at the SM clock given, as the mean and the
largest over the CTAs, next to the launch's own time by graph replay.
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

STAGES = ("ln_1 + qkv", "attention chunks", "projection", "ln_2 + MLP up", "MLP down")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2-medium,gpt2")
    parser.add_argument("--position", type=int, default=511)
    parser.add_argument("--ghz", type=float, default=1.98, help="SM clock used to turn cycles into µs")
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    for name in args.models.split(","):
        weights = GPT2Weights(build_model(name), torch.bfloat16)
        cache = weights.new_kv_cache(1024)
        token = torch.randint(0, 50257, (1,), device="cuda")
        position = torch.tensor([args.position], device="cuda")
        forward = PersistentForward(weights, 1, cache=cache)
        plain = graph_time([lambda f=forward, t=token, p=position: f.run(t, p)])
        forward.trace = True
        traced = graph_time([lambda f=forward, t=token, p=position: f.run(t, p)])
        forward.trace_cycles.zero_()
        forward.run(token, position)
        torch.cuda.synchronize()
        layers = len(weights.layers)
        micros = forward.trace_cycles.double() / (args.ghz * 1e3) / layers
        print(f"\n{name}: {plain:.1f} µs a launch ({traced:.1f} traced), {layers} layers; µs a layer:")
        print("| stage (flag waits included) | mean | max | after it: mean | after it: max |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for i, stage in enumerate(STAGES):
            work, wait = micros[:, i], micros[:, 5 + i]
            print(
                f"| {stage} | {work.mean():.2f} | {work.max():.2f} | {wait.mean():.2f} | {wait.max():.2f} |"
            )
        total = micros[:, :10].sum(dim=1)
        print(f"| all | | | | sum {total.mean():.1f} (CTA mean) |")


if __name__ == "__main__":
    main()
