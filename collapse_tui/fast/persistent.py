"""One kernel launch per generated token: the whole GPT-2 forward as a persistent Triton kernel.

Why: with one kernel per operation a generated token is ~250 launches of
3–7 µs each, most of it ramp-up and latency rather than bytes
(benchmarks/RESULTS.md). Here one launch of about one CTA per SM walks
through every stage of every layer — layer norm, qkv, attention, projection,
layer norm, MLP up, MLP down — and the CTAs meet at a grid barrier (an
atomic counter) where a stage needs the whole of the one before (the layer
norms, which need whole rows), instead of at a kernel boundary. Where a work
item needs only part of the stage before — an attention head its qkv
columns, a K split of the projection or of MLP down its slice of the input —
it waits on a dependency flag (a counter per head or per split) instead, so
it does not wait for the slowest of all CTAs; a product after a layer norm
waits on a count of the normalised rows, so the CTAs without a row need not
arrive anywhere. Within a stage each CTA takes work items ``pid, pid +
grid, ...``: output tiles of a product, heads of the attention, rows of a
layer norm.

It computes what ``GPT2Weights.hidden`` / ``decode_one`` compute, in the same
precision: residual stream in fp32, products in bf16 with fp32 accumulation,
the two products that feed the residual split over K into fp32 partial sums
added in a fixed order (deterministic), attention with an online softmax in
fp32. The weights are the stacked copies ``GPT2Weights`` refreshes in place
(bf16 matrices, fp32 norms and residual biases), so a graph captured over
this launch sees every update.

Two shapes, as in ``FastGPT2Inference``:

- window (``rows`` ≤ 128 tokens at positions 0..rows-1, causal): the sliding
  window of the paper, re-run every token;
- cache (one token at the position held in a device tensor): full-context
  decoding over a static key/value cache that the qkv stage writes into.

The barrier needs every CTA resident at once: the grid never exceeds the
number of SMs, and the kernel uses one CTA's worth of resources per SM. A
barrier that waits far longer than any stage could take gives up, sets an
error flag and lets the kernel finish (wrong numbers, never a hung GPU);
``check`` raises on it.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch

#: Most rows (window tokens) one launch handles: one tile of rows for every product.
MAX_ROWS = 128
#: Widest model that runs persistent. On an H200 (benchmarks/RESULTS.md) gpt2 and gpt2-medium gain
#: 5–23 % a sample; wider models lose against layer by layer (kernel µs a token, window / cached
#: token): gpt2-large (1280) 2304 / 1673 against 1775 / 1535 (its best plan, 64-column tiles with 5 K
#: splits, 1802 / 1758), gpt2-xl (1600) 4637 / 3189 against 3242 / 2920.
MAX_WIDTH = 1024
#: Polls of the barrier counter before a barrier gives up (about a second; a stage takes microseconds).
SPIN_LIMIT = 1 << 20


@dataclass(frozen=True)
class Plan:
    """Tile shapes of one model shape: output columns per item, K step, K splits, warps."""

    block_n: int = 32
    block_k: int = 64
    proj_splits: int = 4
    out_splits: int = 4
    warps: int = 8
    stages: int = 3
    #: query rows per attention item of the window (items are heads × row blocks)
    block_q: int = 16
    block_kv: int = 64
    #: request each product's weight tiles from L2 two stages ahead (persistent_kernel.prefetch_tiles)
    prefetch: bool = True
    #: one cached token: matrix-vector products, two grid barriers a layer (persistent_kernel.decode_kernel)
    matvec: bool = True
    #: keys per attention chunk of a cached token (a power of two)
    chunk: int = 128


#: Shared memory a CTA of the window kernel takes with four stages of weight tiles and key tiles of 128,
#: heads of 64 (sm_90 build, 104,448 bytes; heads of 128 take about twice): more than GPUs of compute
#: capability 8.6 and 8.9 give a CTA (99 KB), which keep three stages and key tiles of 64 (~60 KB).
DEEP_WINDOW_BYTES = 104_448


#: Shared memory a CTA may opt into, by compute capability, for a torch whose device properties do not say:
#: A100, H100/H200, B200; other GPUs (8.6, 8.9, 12.0: RTX cards) 99 KB.
OPTIN_BY_CAPABILITY = {(8, 0): 166_912, (9, 0): 232_448, (10, 0): 232_448}
LEAST_OPTIN = 101_376


def shared_memory_per_block(device: torch.device) -> int | None:
    """Bytes of shared memory a CTA may opt into on ``device``; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    told = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    if told is not None:
        return int(told)
    return OPTIN_BY_CAPABILITY.get(torch.cuda.get_device_capability(device), LEAST_OPTIN)


def default_plan(
    n_embd: int, rows: int = MAX_ROWS, head_dim: int = 64, shared_bytes: int | None = None
) -> Plan:
    """The plan that measured fastest on an H200 (benchmarks/RESULTS.md), fitted to the width and the GPU.

    Four K splits where they divide K into whole K steps, else the nearest
    count that does (gpt2-xl's 1600 takes 5 for the projection, a toy width
    of 128 takes 2). One cached token (``rows`` 1) reads its weights in K
    steps of 128 where the splits allow. A window keeps four stages of
    weight tiles in flight and takes its keys 128 at a time where the GPU
    gives a CTA the shared memory for it (``shared_bytes``; ``None``: assume
    it does, as an H100 or H200 does), else three stages and 64 keys.
    """
    block_k = 64
    candidates = [4, 5, 3, 6, 2, 8, 1]
    proj = next((s for s in candidates if n_embd % (s * block_k) == 0), 1)
    if rows == 1:
        if n_embd % (proj * 128) == 0:
            block_k = 128
        return Plan(block_k=block_k, proj_splits=proj)
    if shared_bytes is not None and shared_bytes < DEEP_WINDOW_BYTES * max(1, head_dim // 64):
        return Plan(block_k=block_k, proj_splits=proj)
    # RESULTS.md, thirteenth session: 729 -> 678 µs a gpt2-medium window token, 304 -> 298 for gpt2
    return Plan(block_k=block_k, proj_splits=proj, stages=4, block_kv=128)


def check_plan(plan: Plan, n_embd: int) -> None:
    """Raise ``ValueError`` unless ``plan`` fits the width: tiles powers of two (products' at least 16,
    ``tl.dot``'s minimum), every split whole.

    Each K split must be a whole number of K steps and at least one 128-byte
    line (64 bf16 values) for the L2 prefetch; every column tile whole.
    """
    for field, least in (("block_n", 16), ("block_k", 16), ("block_q", 16), ("block_kv", 16), ("chunk", 1)):
        value = getattr(plan, field)
        if value < least or value & (value - 1):
            raise ValueError(f"{field}={value} is not a power of two of at least {least}")
    for k, splits in ((n_embd, plan.proj_splits), (4 * n_embd, plan.out_splits)):
        if splits < 1 or k % (splits * plan.block_k) or k // splits < 64:
            raise ValueError(f"K={k} does not split {splits} ways into steps of {plan.block_k}")
    if n_embd % plan.block_n:
        raise ValueError(f"width {n_embd} is not a multiple of {plan.block_n} columns")


def supported_reason(n_embd: int, n_head: int, rows: int, dtype: torch.dtype) -> str | None:
    """Why the persistent kernel cannot run this shape, or ``None`` when it can."""
    head_dim = n_embd // n_head
    if dtype != torch.bfloat16:
        return "needs the bf16 compute dtype (its stores and roundings are bf16)"
    if rows > MAX_ROWS:
        return f"windows of more than {MAX_ROWS} tokens"
    if n_embd % 64 or head_dim * n_head != n_embd or head_dim & (head_dim - 1) or not 16 <= head_dim <= 128:
        return "width or head size (heads of 16 to 128, a power of two)"
    return None


def persistent_unsupported(weights: Any, rows: int) -> str | None:
    """Why ``GPT2Weights`` ``weights`` cannot take the persistent forward for ``rows``; ``None`` if they can.

    ``COLLAPSE_TUI_PERSISTENT=0`` in the environment turns it off (the
    layer-by-layer forward then runs, as on GPUs older than Ampere).
    """
    if os.environ.get("COLLAPSE_TUI_PERSISTENT", "1") == "0":
        return "turned off by COLLAPSE_TUI_PERSISTENT=0"
    device = weights.wte.device
    if device.type != "cuda":
        return "not on a CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs an Ampere or newer GPU"
    if not available():
        return "Triton is not installed"
    if weights.n_embd > MAX_WIDTH:
        return f"a model wider than {MAX_WIDTH} (measured no faster than layer by layer)"
    return supported_reason(weights.n_embd, weights.n_head, rows, weights.dtype)


@functools.cache
def _build() -> Any:
    """The kernels' module, imported (and so decorated) on first use; ``None`` without Triton."""
    try:
        module = importlib.import_module("collapse_tui.fast.persistent_kernel")
    except ImportError:
        return None
    return module


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def available() -> bool:
    return _build() is not None


class PersistentForward:
    """Buffers and launch of the persistent forward for one shape (window rows, or one cached token).

    ``run`` returns ``xn`` ``[BLOCK_M, n_embd]`` in the compute dtype: ``ln_f``
    of the last hidden states, rows ``0..rows-1`` valid; ready for lm_head.
    ``run_sequence`` (a generation step) reads its tokens from the loop's
    sequence and returns the one row lm_head needs. Every buffer is
    allocated here once, so the launch can be captured; the barrier counts
    are zeroed by each launch's last CTA, not by a launch of their own.
    """

    def __init__(
        self,
        weights: Any,
        rows: int,
        cache: torch.Tensor | None = None,
        plan: Plan | None = None,
        grid: int | None = None,
    ) -> None:
        self.weights = weights
        self.rows = rows
        self.cache = cache
        width, heads = weights.n_embd, weights.n_head
        device = weights.wte.device
        self.plan = plan or default_plan(width, rows, width // heads, shared_memory_per_block(device))
        check_plan(self.plan, width)
        self.block_m = max(16, _next_pow2(rows))  # tl.dot takes at least 16 rows
        self.block_d = _next_pow2(width)
        dtype = weights.dtype
        m = self.block_m
        self.h = torch.zeros(m, width, dtype=torch.float32, device=device)
        self.xn = torch.zeros(m, width, dtype=dtype, device=device)
        self.qkv = torch.zeros(m, 3 * width, dtype=dtype, device=device)
        self.attn = torch.zeros(m, width, dtype=dtype, device=device)
        self.ff = torch.zeros(m, 4 * width, dtype=dtype, device=device)
        # decode_kernel keeps the projection's and MLP down's partial sums apart (see there)
        splits = (
            self.plan.proj_splits + self.plan.out_splits
            if self.matvec
            else max(self.plan.proj_splits, self.plan.out_splits)
        )
        self.part = torch.zeros(splits, m, width, dtype=torch.float32, device=device)
        heads_chunks = heads * self._chunks(cache)[1]
        self.attn_out = torch.zeros(heads_chunks, width // heads, dtype=torch.float32, device=device)
        self.attn_stats = torch.zeros(heads_chunks, 2, dtype=torch.float32, device=device)
        # the grid barrier's counter, then the dependency flags (persistent_kernel.forward_kernel: per
        # head, per K split of each product, layer-norm rows), and last the count of CTAs that are done;
        # the last CTA out of a launch copies them to ``final`` and zeroes them (persistent_kernel.leave)
        flags = 1 + heads + self.plan.proj_splits + self.plan.out_splits
        self.sync = torch.zeros(_next_pow2(flags + 2), dtype=torch.int32, device=device)
        self.counter, self.flags = self.sync[:1], self.sync[1 : 1 + flags]
        self.final = torch.zeros_like(self.sync)
        #: the row lm_head reads after a window launch: ln_f of the last real row (``run_sequence``)
        self.last_row = torch.zeros(1, width, dtype=dtype, device=device)
        self.error = torch.zeros(1, dtype=torch.int32, device=device)
        self.cache_len = cache.size(3) if cache is not None else 1
        self._dummy_cache = torch.zeros(1, dtype=dtype, device=device)
        self._position = torch.zeros(1, dtype=torch.long, device=device)
        if grid is None:
            grid = (
                torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
            )
        self.grid = grid
        self.last_kernel = "decode_kernel" if self.matvec else "forward_kernel"
        self.last_work = True
        self.last_from_sequence = False
        #: the kernels count SM cycles per stage into ``trace_cycles`` (benchmarks/trace_persistent.py)
        self.trace = False
        self.trace_cycles = torch.zeros(grid, 16, dtype=torch.int64, device=device)
        self.scale = 1.0 / (width // heads) ** 0.5
        head_dim, block_n = width // heads, self._block_n()
        proj_k, out_k = width // self.plan.proj_splits, 4 * width // self.plan.out_splits
        if proj_k % head_dim and head_dim % proj_k:
            raise ValueError(f"the projection's K splits of {proj_k} cut heads of {head_dim} unevenly")
        if out_k % block_n and block_n % out_k:
            raise ValueError(f"MLP down's K splits of {out_k} cut tiles of {block_n} columns unevenly")

    @property
    def matvec(self) -> bool:
        """Whether launches take ``decode_kernel`` (one cached token) rather than ``forward_kernel``."""
        return self.cache is not None and self.plan.matvec

    @property
    def barriers(self) -> int:
        """Grid barriers the last launch passed: two a layer, either kernel."""
        return 2 * len(self.weights.layers)

    def flag_counts(self) -> dict[str, int]:
        """What each dependency flag counts a layer.

        ``QKV_COUNT``: qkv tiles touching a head (its query, key and value
        columns); ``ATTN_COUNT``: attention items (heads × key chunks) in a K
        split of the projection; ``UP_COUNT``: MLP-up tiles in a K split of
        MLP down. A K split holds whole heads or lies inside one, and whole
        tiles or lies inside one (``__init__`` checks).
        """
        width, heads, block_n = self.weights.n_embd, self.weights.n_head, self._block_n()
        head_dim = width // heads
        proj_k, out_k = width // self.plan.proj_splits, 4 * width // self.plan.out_splits
        chunks = self._chunks(self.cache)[1] if self.matvec else self.block_m // self._block_q()
        return {
            "QKV_COUNT": 3 * max(1, head_dim // block_n),
            "ATTN_COUNT": chunks * max(1, proj_k // head_dim),
            "UP_COUNT": max(1, out_k // block_n),
        }

    def expected_flags(self) -> list[int]:
        """The flags' values after the last launch: each count times the layers (none without work).

        The last flag counts the rows ``forward_kernel``'s layer-norm stages
        finished (two a layer and the embedding's; a window from the sequence
        has only one row in the last layer's two); ``decode_kernel`` leaves it
        at 0.
        """
        w, plan = self.weights, self.plan
        counts = self.flag_counts()
        layers = len(w.layers) if self.last_work else 0
        rows = 0
        if self.last_work and self.last_kernel == "forward_kernel":
            rows = self.rows * (2 * layers + 1)
            if self.last_from_sequence and self.cache is None:
                rows -= 2 * (self.rows - 1)
        return (
            [counts["QKV_COUNT"] * layers] * w.n_head
            + [counts["ATTN_COUNT"] * layers] * plan.proj_splits
            + [counts["UP_COUNT"] * layers] * plan.out_splits
            + [rows]
        )

    def _block_q(self) -> int:
        """Query rows per attention item of ``forward_kernel``: the plan's, at most the rows' tile."""
        return min(self.plan.block_q, self.block_m)

    def _block_n(self) -> int:
        """Output columns per tile: the plan's, or ``decode_kernel``'s own (32, fewer for wide models)."""
        return max(8, min(32, 32768 // self.block_d)) if self.matvec else self.plan.block_n

    def _chunks(self, cache: torch.Tensor | None) -> tuple[int, int]:
        """Keys per attention chunk and chunks per head (both powers of two) for the cache's length."""
        if cache is None:
            return 1, 1
        length = cache.size(3)
        chunk = min(self.plan.chunk, _next_pow2(length))
        return chunk, _next_pow2(-(-length // chunk))

    def run(
        self, tokens: torch.Tensor, position: torch.Tensor | None = None, work: bool = True
    ) -> torch.Tensor:
        """Forward of ``tokens`` [rows] (window) or of one token at ``position`` [1] (cache).

        ``work=False`` passes the barriers only (benchmarks time them so).
        """
        self._launch(tokens, position, work, from_sequence=False)
        return self.xn

    def run_sequence(self, seq: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
        """The forward a generation step needs, its tokens read by the kernel from ``seq`` [capacity].

        Window: the ``rows`` tokens before position ``counter`` [1] (from 0
        while the sequence is shorter, the rest padding); cache: the token at
        ``counter``. Returns the ``[1, n_embd]`` row lm_head takes (``ln_f``
        of the window's last real row, or of the cached token). One launch:
        no gather of the window before it, no pick of the row after it.
        """
        self._launch(seq, counter, True, from_sequence=True)
        return self.xn[:1] if self.matvec else self.last_row

    def _launch(
        self, tokens: torch.Tensor, position: torch.Tensor | None, work: bool, from_sequence: bool
    ) -> None:
        module = _build()
        assert module is not None, "Triton is not installed"
        name, args, constants = self.launch(tokens, position, work, from_sequence)
        self.last_kernel, self.last_work, self.last_from_sequence = name, work, from_sequence
        getattr(module, name)[(self.grid,)](*args, **constants)

    def launch(
        self,
        tokens: torch.Tensor,
        position: torch.Tensor | None = None,
        work: bool = True,
        from_sequence: bool = False,
    ) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        """The kernel's name, its arguments and its compile-time constants (with warps and stages) for a launch.

        Separate from ``run`` so that scripts/compile_kernels.py can build the
        very same kernels for a GPU target on a machine without one.
        """
        w, plan = self.weights, self.plan
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        width, heads = w.n_embd, w.n_head
        stacks = (
            w.qkv_w_all, w.qkv_b_all, w.proj_w_all, w.proj_b_all, w.fc_w_all, w.fc_b_all, w.out_w_all,
            w.out_b_all, w.ln1_w_all, w.ln1_b_all, w.ln2_w_all, w.ln2_b_all,
        )  # fmt: skip
        common = {
            "D": width, "H": heads, "HD": width // heads, "LC": self.cache_len, "BLOCK_D": self.block_d,
            "PROJ_SPLITS": plan.proj_splits, "OUT_SPLITS": plan.out_splits,
            # one program under the interpreter: a wait its own work has not met will never be met
            "SPIN": 64 if interpreted else SPIN_LIMIT,
            "PREFETCH": plan.prefetch and not interpreted, "num_warps": plan.warps,
            "FROM_SEQ": from_sequence, "SYNC_SLOTS": self.sync.numel(),
        }  # fmt: skip
        if self.matvec and work:
            assert position is not None and self.cache is not None
            chunk, chunks = self._chunks(self.cache)
            args = (
                tokens, position, w.wte, w.wpe, *stacks,
                self.h, self.xn, self.qkv, self.ff, self.part, self.attn_out, self.attn_stats, self.cache,
                self.counter, self.flags, self.final, self.error, self.trace_cycles, len(w.layers), w.eps,
                self.scale,
            )  # fmt: skip
            constants = {
                "BN": self._block_n(), "KSPLIT": chunks, "CH": chunk, **self.flag_counts(),
                "KX_PROJ": _next_pow2(width // plan.proj_splits),
                "KX_OUT": _next_pow2(4 * width // plan.out_splits),
                "TRACE": self.trace and not interpreted, **common,
            }  # fmt: skip
            return "decode_kernel", args, constants
        cached = self.cache is not None
        args = (
            tokens, position if position is not None else self._position, w.wte, w.wpe, *stacks,
            self.h, self.xn, self.last_row, self.qkv, self.attn, self.ff, self.part,
            self.cache if cached else self._dummy_cache, self.counter, self.flags, self.final, self.error,
            self.trace_cycles, self.rows, len(w.layers), w.eps, self.scale,
        )  # fmt: skip
        constants = {
            **self.flag_counts(),
            "BLOCK_M": self.block_m, "CACHED": cached, "BN": plan.block_n, "BK": plan.block_k,
            "BLOCK_Q": self._block_q(),
            "BLOCK_KV": plan.block_kv, "UPCAST": interpreted, "WORK": work, "num_stages": plan.stages,
            "TRACE": self.trace and not interpreted, **common,
        }  # fmt: skip
        return "forward_kernel", args, constants

    def failed(self) -> bool:
        """Whether a barrier gave up since the buffers were made (one host sync)."""
        return bool(int(self.error.item()))

    def check(self) -> None:
        """Raise if a barrier gave up, the counter shows a CTA missed one, or a flag is off (host sync: tests only).

        Reads what the last launch counted (``final``) and checks that it
        left the live counts zeroed for the next.
        """
        if int(self.error.item()):
            raise RuntimeError("a grid barrier of the persistent forward timed out")
        counter, flags = int(self.final[0]), self.final[1 : 1 + self.flags.numel()].tolist()
        expected = self.barriers * self.grid
        if counter != expected:
            raise RuntimeError(f"barrier counter {counter}, expected {expected}")
        if flags != self.expected_flags():
            raise RuntimeError(f"dependency flags {flags}, expected {self.expected_flags()}")
        if int(self.final[-1]) != self.grid:
            raise RuntimeError(f"{int(self.final[-1])} CTAs counted themselves out, expected {self.grid}")
        if self.sync.any():
            raise RuntimeError(f"the launch left its counts at {self.sync.tolist()}, not zeroed")
