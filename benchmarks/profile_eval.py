"""Where an iteration's evaluation time goes: one validation set's loss on the engine's path.

    python benchmarks/profile_eval.py --models smollm2-135m,gpt2-medium --block 100

For each model (random weights, as the engine runs it: GPT-2 through
``FastGPT2Inference``, others through ``GraphedInference`` with bf16
autocast): the wall time of ``mean_loss`` over ``--tokens`` validation
tokens in windows of ``block`` (the engine's evaluation of one set; the
median of ``--repeats``), the number of kernels it launches, and the kernels
that take the most device time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generic import build_model as build_generic
from bench_iteration import build_model as build_gpt2
from timing import kernels_of

from collapse_tui.fast import FastGPT2Inference
from collapse_tui.fast.graphed import GraphedInference
from collapse_tui.inference import Inference


def inference_for(name: str, block: int) -> tuple[Inference, int]:
    """The engine's inference for a random-weight model of the named shape, and its vocabulary."""
    if name.startswith("gpt2"):
        model = build_gpt2(name)
        return FastGPT2Inference(model, block, 1.0, 200), model.config.vocab_size
    model = build_generic(name)
    return GraphedInference(model, block, 1.0, 200, torch.bfloat16), model.config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2-135m,gpt2-medium")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument(
        "--tokens", type=int, default=12800, help="validation tokens (the engine's eval_tokens)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.models.split(","):
        inference, vocab = inference_for(name, args.block)
        count = args.tokens // args.block
        windows = torch.randint(0, vocab, (count, args.block + 1), generator=torch.Generator().manual_seed(0))
        inference.mean_loss([windows])  # warm-up: cuBLAS and Triton pick and build their kernels
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            inference.mean_loss([windows])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds, kernels, table = kernels_of(lambda i=inference, w=windows: i.mean_loss([w]), args.rows)
        print(
            f"\n## {name}, block {args.block}, {count} windows: {sorted(times)[len(times) // 2] * 1e3:.1f} ms "
            f"wall (median of {args.repeats}); {kernels} kernels, {seconds * 1e3:.1f} ms of kernel time",
            flush=True,
        )
        print(table, flush=True)
        del inference
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
