"""Where a generated token's time goes on the graphed path for models other than GPT-2.

    python benchmarks/profile_graphed.py --models smollm2-135m --block 100 --modes default,max-autotune-no-cudagraphs

For each ``torch.compile`` mode: the time of one replayed step (CUDA events
over many replays of the one-step graph), the number of kernels one step
launches and the kernels that take the most device time (from a step run
outside the graphs under the profiler: replays hide their kernels). Random
weights, bf16 copy, as the engine runs it (``fast/graphed.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generic import build_model
from timing import kernels_of, step_replay_seconds

from collapse_tui.fast.graphed import GraphedInference


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument(
        "--modes",
        default="default",
        help="torch.compile modes, comma-separated; 'none': no compile; 'unfused': default without shared-input "
        "products fused; other modes (max-autotune, ...) compile without them too: torch.compile takes a mode "
        "or options, not both",
    )
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.models.split(","):
        model = build_model(name)
        for mode in args.modes.split(","):
            graphed = GraphedInference(
                model,
                args.block,
                1.0,
                200,
                torch.bfloat16,
                compile=mode != "none",
                fuse_products=mode != "unfused",
            )
            if mode not in ("none", "default", "unfused"):
                graphed.forward = torch.compile(graphed.weights.module, dynamic=False, mode=mode)
            started = time.perf_counter()
            kv = args.block >= 1024  # full context: 1023 new tokens against the static cache
            graphed.prepare(1, args.block - 1 if kv else 1024)
            prepared = time.perf_counter() - started
            steps = graphed._steps[kv]
            position = args.block // 2 if kv else args.block + 1
            step_ms = step_replay_seconds(steps, position) * 1e3
            generator = torch.Generator(device="cuda").manual_seed(0)

            def one_step(steps=steps, generator=generator, position=position) -> None:
                steps.counter.fill_(position)
                with torch.no_grad(), torch.autocast("cuda", enabled=False):
                    steps.step(generator)

            one_step()
            seconds, count, table = kernels_of(one_step, args.rows)
            print(f"  {graphed.description}")
            print(
                f"\n## {name}, block {args.block}, compile {mode}: {step_ms:.3f} ms a replayed step; "
                f"{count} kernels, {seconds * 1e3:.3f} ms of kernel time in one step outside graphs; "
                f"prepare {prepared:.1f} s"
            )
            print(table, flush=True)
            del graphed, steps
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
