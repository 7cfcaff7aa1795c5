"""Where one generated token's time goes: graph-replay time per step and the kernels of one step.

    python benchmarks/profile_step.py --model gpt2-medium --block 100

Prints the time of one replayed step (CUDA events over many replays), the
number of kernels in one step and the kernels that take the most device time
(from an eager step under the profiler, since replays hide their kernels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_iteration import build_model
from timing import graph_time, kernels_of, step_replay_seconds

from collapse_tui.fast import FastGPT2Inference


def kernel_table(fast: FastGPT2Inference, kv: bool, rows: int) -> str:
    decoder = fast._decoders[kv]
    generator = torch.Generator(device="cuda").manual_seed(0)
    decoder.counter.fill_(fast.block if not kv else 1)
    with torch.no_grad():
        decoder.step(generator)
        torch.cuda.synchronize()
        decoder.counter.fill_(fast.block if not kv else 1)
        seconds, count, table = kernels_of(lambda: decoder.step(generator), rows)
    return f"{count} kernels, {seconds * 1e6:.0f} us of kernel time in one eager step\n" + table


def gemm_layouts(width: int) -> str:
    """Microseconds per product of the per-token shapes, weights as ``[out, in]`` or ``[in, out]``."""
    lines = ["M | in -> out | linear [out,in] us | mm [in,out] us"]
    for rows in (1, 100):
        for k, n in ((width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            w_out_in = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            w_in_out = w_out_in.t().contiguous()
            times = []
            pairs = ((torch.nn.functional.linear, w_out_in), (torch.mm, w_in_out))
            for op, w in pairs:

                def fn(op=op, w=w, x=x) -> torch.Tensor:
                    return op(x, w)

                times.append(graph_time([fn] * 50))
            lines.append(f"{rows} | {k} -> {n} | {times[0]:.2f} | {times[1]:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2-medium")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = build_model(args.model)
    fast = FastGPT2Inference(model, args.block, 1.0, 200)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = 1024 if args.block < 1024 else 1023
    fast.generate([50256], tokens, gen)
    kv = tokens <= args.block
    step = step_replay_seconds(fast._decoders[kv], 1 if kv else fast.block)
    print(f"{args.model} block {args.block} ({fast.description}): {step * 1e3:.3f} ms per replayed step")
    print(kernel_table(fast, kv, args.rows))
    print(gemm_layouts(model.config.n_embd))


if __name__ == "__main__":
    main()
