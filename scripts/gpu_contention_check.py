"""Generation while another kernel holds some of the GPU's SMs: the one-launch kernels must give up, not hang.

The cluster kernel (collapse_tui/fast/cluster.py) and the Triton persistent
kernel need every CTA resident at once; on a GPU shared with another process
some of theirs may wait for SMs that never free up in time. Their polls and
barriers then give up after about a second, flag it, and the decoder hands
the step to the next kernel in line (or to layer by layer) and generates the
sample again. This script stands in for the other process: a kernel of
``--sms`` CTAs, each taking a whole SM's shared memory, spins for
``--seconds`` on a side stream while a full-context sample is generated::

    python scripts/gpu_contention_check.py --sms 16 --seconds 4

It prints how long the sample took, which kernel each decoder ended on, and
whether the sample matches the one generated on the idle GPU (by the same
kernels) with the same seed; it need not, since a sample generated again
draws a fresh seed. Exits
non-zero if the sample is not complete. Meant for a GPU machine (CI has none).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from collapse_tui.fast import FastGPT2Inference
from collapse_tui.fast.cluster import allow_shared_memory, compile_source

HOG = """
extern "C" __global__ void hog(int microseconds, int* done) {
    extern __shared__ int pad[];
    long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < 1000LL * microseconds);
    if (threadIdx.x == 0) { pad[0] = 1; atomicAdd(done, pad[0]); }
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sms", type=int, default=16, help="SMs the other kernel holds")
    parser.add_argument("--seconds", type=float, default=4.0, help="how long it holds them")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=24, n_head=16, n_embd=1024)
    with torch.device("cuda"):
        model = GPT2LMHeadModel(config).eval()
    fast = FastGPT2Inference(model, 1024, 1.0, 200)
    fast.prepare(1, args.tokens)  # builds and checks the kernels on the idle GPU
    kernels = {kv: type(d.persistent).__name__ for kv, d in fast._decoders.items()}
    print(f"idle GPU: {fast.description}; kernels {kernels}")
    idle = fast.generate([50256], args.tokens, torch.Generator(device="cuda").manual_seed(5))

    shared = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    hog = compile_source(HOG, torch.cuda.current_device(), "hog")
    allow_shared_memory(hog, shared)  # one CTA an SM, and no room there for anyone else's
    done = torch.zeros(1, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    start = time.perf_counter()
    with torch.cuda.stream(side):
        hog(grid=(args.sms, 1, 1), block=(32, 1, 1), args=[int(args.seconds * 1e6), done], shared_mem=shared)
    busy = fast.generate([50256], args.tokens, torch.Generator(device="cuda").manual_seed(5))
    torch.cuda.synchronize()
    took = time.perf_counter() - start
    kernels = {kv: type(d.persistent).__name__ for kv, d in fast._decoders.items()}
    print(
        f"with {args.sms} SMs held for {args.seconds} s: the sample took {took:.2f} s; kernels now {kernels}"
    )
    print(
        f"the other kernel finished: {int(done) == args.sms}; same sample as on the idle GPU: {busy == idle}"
    )
    if len(busy) != args.tokens + 1:
        raise SystemExit(f"FAILED: {len(busy)} tokens, expected {args.tokens + 1}")
    print("ok   the sample is complete")


if __name__ == "__main__":
    main()
