"""Where an iteration's evaluation and training time goes: wall time against the GPU's kernel time.

    python benchmarks/profile_phases.py --model gpt2-medium --block 100

Runs two iterations of the engine's loop (bench_iteration.EngineLoop) to warm
up, then times each part of the evaluation and of the training step with a
sync around it, and sums the CUDA kernels' time of the same part under the
profiler. A part whose wall time is far above its kernel time is bound by
the host launching kernels, not by the GPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_iteration import EngineLoop, build_model, timed
from timing import kernels_of

from collapse_tui.data import eval_windows
from collapse_tui.engine import Engine
from collapse_tui.inference import sequence_windows
from collapse_tui.metrics import repetition_metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gpt2-medium")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--kernels", type=int, default=0, help="also print each part's top kernels")
    args = parser.parse_args()
    torch.manual_seed(0)
    val = eval_windows(torch.randint(0, 50257, (300_000,)).tolist(), args.block, 12_800)
    gen_tokens = 1024 if args.block < 1024 else 1023
    loop = EngineLoop(build_model(args.model), args.block, gen_tokens, val)
    for _ in range(2):
        loop.iteration()
    ids = loop.inference.generate([50256], gen_tokens, loop.sampler)
    inference, engine = loop.inference, loop.engine
    parts: dict[str, Callable[[], object]] = {
        "evaluate: generated text": lambda: inference.mean_loss(sequence_windows(ids, args.block)),
        "evaluate: validation set": lambda: inference.mean_loss([val]),
        "evaluate: both in one batch (as the engine)": lambda: inference.mean_losses(
            [sequence_windows(ids, args.block), [val]]
        ),
        "evaluate: repetition metrics (CPU)": lambda: repetition_metrics(ids[1:], ""),
        "train step": lambda: Engine._train_step(engine, ids),  # type: ignore[arg-type]
    }
    print(f"{torch.cuda.get_device_name()}, {args.model}, block {args.block}")
    print("| part | wall ms | kernel ms | kernels |")
    print("| --- | ---: | ---: | ---: |")
    tables = []
    for name, fn in parts.items():
        wall = min(timed(fn)[0] for _ in range(3))
        kernels, count, table = kernels_of(fn, args.kernels)
        print(f"| {name} | {wall * 1e3:.1f} | {kernels * 1e3:.1f} | {count} |")
        tables.append(f"\n{name}:\n{table}" if table else "")
    print("".join(tables))


if __name__ == "__main__":
    main()
