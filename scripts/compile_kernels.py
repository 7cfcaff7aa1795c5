"""Build the persistent kernels and the sampling kernels for a GPU target on a machine without a GPU.

    python scripts/compile_kernels.py --arch 90

Triton's interpreter (tests/test_persistent.py) checks what the kernels
compute but not what the compiler refuses: a loop-carried variable that
changes shape, a pointer of the wrong type. This builds every launch the
engine makes — the window kernel and both cached-token kernels, as
``run`` and as ``run_sequence`` launch them, and the traced builds of
benchmarks/trace_persistent.py — for GPT-2 widths (gpt2,
gpt2-medium) down to the target's machine code with Triton's own
``ptxas``, exactly as ``run`` would launch them
(``PersistentForward.launch``), and the top-k race's kernels as
``topk_race.launches`` gives them. It needs Triton but no GPU and
must run without ``TRITON_INTERPRET`` (tests/test_persistent.py starts it in
a subprocess).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch
from transformers import GPT2Config, GPT2LMHeadModel

DTYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
}
SHAPES = {"gpt2": (768, 12), "gpt2-medium": (1024, 16)}


def type_of(value: object) -> str:
    """Triton's signature string for one runtime argument."""
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def aligned(names: list[str], values: dict, constants: dict) -> dict:
    """The divisibility hints Triton's launcher gives: pointers on 16 bytes, integers divisible by 16.

    Without them the build differs from the real launch's: Triton cannot
    prove a load aligned, so its pipeliner leaves the K loops' loads
    synchronous (no ``cp.async``, one stage of shared memory).
    """
    hints = {}
    for index, name in enumerate(names):
        value = values.get(name)
        if name in constants or isinstance(value, bool):
            continue
        if isinstance(value, torch.Tensor):
            divisible = value.data_ptr() % 16 == 0
        else:
            divisible = isinstance(value, int) and value % 16 == 0
        if divisible:
            hints[(index,)] = [["tt.divisibility", 16]]
    return hints


def resources(cubin: bytes) -> tuple[str, str] | None:
    """Registers a thread and spilled stack bytes of a built kernel, by the ``cuobjdump`` Triton ships.

    Why: one CTA per SM runs every stage of the persistent kernel, so the
    stage that needs the most registers sets them for all; past 255 a
    thread spills, and every stage pays (benchmarks/RESULTS.md: wider
    product tiles that were faster alone were slower in the kernel).
    ``None`` where Triton ships no ``cuobjdump``.
    """
    import re
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run(
            [str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True
        )
    found = dict(re.findall(r"\b(REG|STACK):(\d+)", usage.stdout))
    return (found["REG"], found.get("STACK", "0")) if "REG" in found else None


def compile_launch(module: object, name: str, args: tuple, constants: dict, arch: int) -> tuple[float, str]:
    """Build one launch's kernel for ``sm_<arch>``; seconds taken, and what it uses (``resources``; empty
    without ``cuobjdump``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(module, name)
    options = {key: constants.pop(key) for key in ("num_warps", "num_stages") if key in constants}
    values = dict(zip(fn.arg_names, args, strict=False)) | constants
    signature = {arg: "constexpr" if arg in constants else type_of(values[arg]) for arg in fn.arg_names}
    constexprs = {(fn.arg_names.index(arg),): value for arg, value in constants.items()}
    start = time.perf_counter()
    source = ASTSource(fn, signature, constexprs, aligned(fn.arg_names, values, constants))
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - start
    used = resources(kernel.asm["cubin"])
    if used is None:
        return seconds, ""
    registers, stack = used
    shared = kernel.metadata.shared // 1024
    return (
        seconds,
        f"; {registers} registers a thread, {stack} bytes of stack (spills), {shared} KB of shared memory",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability: 90 for H100/H200, 80 for A100"
    )
    parser.add_argument("--models", default="gpt2,gpt2-medium")
    args = parser.parse_args()

    from collapse_tui.fast import persistent
    from collapse_tui.fast.gpt2 import GPT2Weights

    module = persistent._build()
    if module is None:
        sys.exit("compile_kernels.py: Triton is not installed")
    for name in args.models.split(","):
        width, heads = SHAPES[name]
        config = GPT2Config(n_layer=1, n_head=heads, n_embd=width, vocab_size=64, n_positions=1024)
        weights = GPT2Weights(GPT2LMHeadModel(config), torch.bfloat16)
        cache = weights.new_kv_cache(1024)
        token, position = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        sequence = torch.zeros(1024, dtype=torch.long)
        window = torch.zeros(100, dtype=torch.long)
        plain = replace(persistent.default_plan(width, 1), matvec=False)
        traced = persistent.PersistentForward(weights, 1, cache=cache, grid=132)
        traced.trace = True
        traced_window = persistent.PersistentForward(weights, 100, grid=132)
        traced_window.trace = True
        # label: (forward, launch's arguments); generation's steps read their tokens from the sequence
        launches = {
            "window, 100 rows": (persistent.PersistentForward(weights, 100, grid=132), (window,)),
            "window, 100 rows, from the sequence": (
                persistent.PersistentForward(weights, 100, grid=132),
                (sequence, position, True, True),
            ),
            "cached token": (
                persistent.PersistentForward(weights, 1, cache=cache, grid=132),
                (token, position),
            ),
            "cached token, from the sequence": (
                persistent.PersistentForward(weights, 1, cache=cache, grid=132),
                (sequence, position, True, True),
            ),
            "cached token, forward_kernel": (
                persistent.PersistentForward(weights, 1, cache=cache, plan=plain, grid=132),
                (sequence, position, True, True),
            ),
            "cached token, traced": (traced, (token, position)),
            "window, traced": (traced_window, (window,)),
        }
        for label, (forward, inputs) in launches.items():
            kernel, kernel_args, constants = forward.launch(*inputs)
            seconds, used = compile_launch(module, kernel, kernel_args, dict(constants), args.arch)
            print(f"{name}: {label}: {kernel} built for sm_{args.arch} in {seconds:.1f} s{used}", flush=True)
    compile_sampling(args.arch)


def compile_sampling(arch: int) -> None:
    """Every launch of the top-k race: bf16 and fp32 logits, with and without top-k, with and without appending."""
    from collapse_tui.fast import topk_race, topk_race_kernel

    sequence, counter = torch.zeros(1024, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    for dtype in (torch.bfloat16, torch.float32):
        for top_k in (200, None):
            appends = (None, topk_race.Append(sequence, counter, 0), topk_race.Append(sequence, counter, 1))
            for append in appends:
                logits, draws = torch.zeros(50257, dtype=dtype), torch.ones(50257)
                buffers = topk_race.RaceBuffers(50257, logits.device)
                plan, _ = topk_race.launches(logits, draws, top_k, 1.0, buffers, append)
                for kernel, _grid, kernel_args, constants in plan:
                    seconds, used = compile_launch(
                        topk_race_kernel, kernel, kernel_args, dict(constants), arch
                    )
                    where = f", appended at the counter + {append.offset}" if append else ""
                    label = f"{DTYPES[dtype]} logits, top-k {top_k}{where}"
                    print(
                        f"sampling: {label}: {kernel} built for sm_{arch} in {seconds:.1f} s{used}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
