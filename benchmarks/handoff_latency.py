"""What a hand-off between SMs costs in plain CUDA: the floor under any persistent kernel's stages.

    python benchmarks/handoff_latency.py

Every stage of the persistent forward (collapse_tui/fast/persistent.py)
ends in a hand-off: the CTAs that produced a stage's data count themselves
done on a counter in global memory, and the CTAs of the next stage poll it.
The Triton kernel's bare grid barrier measured ~1.1 µs (tune_persistent.py's
"barriers only" row). Whether a hand-written CUDA kernel could do much
better decides how much a CUDA megakernel with the same chain of stages can
gain (benchmarks/RESULTS.md, "What would close the gap"). This times, with
kernels compiled at run time by NVRTC (``torch.cuda._compile_kernel``, no
nvcc needed):

- a grid barrier of one CTA per SM, three ways: an ``atom.release...add``
  arrival with an ``ld.acquire`` poll; a ``red.release`` arrival with a
  relaxed poll and one fence after; ``__threadfence`` + ``atomicAdd`` with
  a volatile poll (the cooperative-groups way). One thread of each CTA
  arrives and polls; the CTA's threads meet at ``__syncthreads`` around it;
- one hop: two CTAs pass a counter back and forth (release store, acquire
  poll), between neighbouring SMs and between the first and the last CTA;
  a round is two hops.

A poll that waits ~4 million reads gives up and sets an error flag, so a
grid whose CTAs are not all resident ends instead of hanging.
"""

from __future__ import annotations

import argparse

import torch

SOURCE = r"""
#define SPIN_LIMIT (1 << 22)

__device__ __forceinline__ int load_acquire(const int* p) {
    int v; asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ int load_relaxed(const int* p) {
    int v; asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}

extern "C" __global__ void grid_barriers(int* counter, int* error, int n, int mode) {
    const int grid = gridDim.x;
    for (int b = 1; b <= n; ++b) {
        __syncthreads();
        if (threadIdx.x == 0) {
            const int target = b * grid;
            int seen = 0, spins = 0;
            if (mode == 0) {
                asm volatile("atom.release.gpu.global.add.s32 %0, [%1], 1;" : "=r"(seen) : "l"(counter) : "memory");
                do { seen = load_acquire(counter); } while (seen < target && ++spins < SPIN_LIMIT);
            } else if (mode == 1) {
                asm volatile("red.release.gpu.global.add.s32 [%0], 1;" :: "l"(counter) : "memory");
                do { seen = load_relaxed(counter); } while (seen < target && ++spins < SPIN_LIMIT);
                asm volatile("fence.acq_rel.gpu;" ::: "memory");
            } else {
                __threadfence();
                atomicAdd(counter, 1);
                do { seen = *((volatile int*)counter); } while (seen < target && ++spins < SPIN_LIMIT);
                __threadfence();
            }
            if (seen < target) { atomicExch(error, 1); return; }
        }
        __syncthreads();
    }
}

extern "C" __global__ void ping_pong(int* flags, int* error, int rounds, int partner) {
    const int me = blockIdx.x;
    if (threadIdx.x != 0 || (me != 0 && me != partner)) return;
    int* mine = flags + (me == 0 ? 0 : 32);   // two 128-byte lines
    int* theirs = flags + (me == 0 ? 32 : 0);
    for (int i = 1; i <= rounds; ++i) {
        if (me == 0) asm volatile("st.release.gpu.global.s32 [%0], %1;" :: "l"(mine), "r"(i) : "memory");
        int seen = 0, spins = 0;
        do { seen = load_acquire(theirs); } while (seen < i && ++spins < SPIN_LIMIT);
        if (seen < i) { atomicExch(error, 1); return; }
        if (me != 0) asm volatile("st.release.gpu.global.s32 [%0], %1;" :: "l"(mine), "r"(i) : "memory");
    }
}
"""

BARRIER_MODES = {
    0: "atom.release.add, ld.acquire poll",
    1: "red.release, relaxed poll, fence after",
    2: "__threadfence + atomicAdd, volatile poll",
}


def time_launches(launch, reset, repeats: int) -> float:
    """Median µs of one ``launch`` (each after ``reset``), over ``repeats`` timed launches."""
    times = []
    for _ in range(repeats + 2):  # two warm-ups
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times[2:])[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--barriers", default="48,2000", help="barriers a launch (48: gpt2-medium's)")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    barrier_kernel = torch.cuda._compile_kernel(SOURCE, "grid_barriers")
    ping_kernel = torch.cuda._compile_kernel(SOURCE, "ping_pong")
    counter = torch.zeros(64, dtype=torch.int32, device="cuda")
    error = torch.zeros(1, dtype=torch.int32, device="cuda")

    def reset() -> None:
        counter.zero_()

    print(f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}")
    print("| hand-off | CTAs | count a launch | µs a launch | µs each |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n in (int(x) for x in args.barriers.split(",")):
        for mode, name in BARRIER_MODES.items():
            micros = time_launches(
                lambda n=n, mode=mode: barrier_kernel(
                    grid=(sms, 1, 1), block=(256, 1, 1), args=[counter, error, n, mode]
                ),
                reset,
                args.repeats,
            )
            print(f"| grid barrier: {name} | {sms} | {n} | {micros:.1f} | {micros / n:.3f} |", flush=True)
    for partner, where in ((1, "CTAs 0 and 1"), (sms - 1, f"CTAs 0 and {sms - 1}")):
        micros = time_launches(
            lambda partner=partner: ping_kernel(
                grid=(sms, 1, 1), block=(32, 1, 1), args=[counter, error, args.rounds, partner]
            ),
            reset,
            args.repeats,
        )
        hops = 2 * args.rounds
        print(
            f"| one hop (release store, acquire poll), {where} | 2 | {hops} | {micros:.1f} | {micros / hops:.3f} |"
        )
    if int(error.item()):
        print("a poll gave up: the numbers above are not valid (were all CTAs resident?)")


if __name__ == "__main__":
    main()
