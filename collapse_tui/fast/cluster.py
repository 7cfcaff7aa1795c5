"""A cached GPT-2 token in one launch with no grid barrier: the CUDA kernel of ``cuda/cluster_decode.cu``.

Why: the Triton decode kernel (``persistent.py``) walks a layer as a chain of
stages that meet at grid barriers and dependency flags; on an H200 a
gpt2-medium layer takes ~22 µs, most of it hand-off latency, not bytes. In
this kernel the CTAs come in Hopper thread block clusters that push their
values straight into each other's shared memory, and values that cross
clusters carry their own tag, so no hand-off waits for the whole grid: 17.0
µs a gpt2-medium layer against the Triton kernel's 22.4, 13.0 for gpt2
against 19.3 (benchmarks/RESULTS.md, ninth session). It computes what the Triton kernel computes, in the same
precision, with its sums in a fixed order (deterministic).

It runs the full-context step (and a window sample's cached start) where it
can: a Hopper GPU (sm_90: clusters, ``st.async``), bf16, GPT-2 with heads of
64 and a width of a multiple of 256 up to gpt2-large's (measured and
GPU-tested on gpt2, gpt2-medium and gpt2-large), torch able to compile CUDA
at run time (``torch.cuda._compile_kernel``, NVRTC), and every cluster
resident at once (the driver says how many fit). Elsewhere, or with
``COLLAPSE_TUI_CLUSTER=0``, the Triton kernel runs (up to gpt2-medium's
width; layer by layer beyond). It is compiled when first needed, the shape as
macros, once per shape and device in a process.

Three of its weights come in layouts of its own, kept by ``GPT2Weights`` as
copies refreshed with the others after every optimizer step (so a CUDA graph
over this launch sees every update): the projection as ``[layer, head, rank,
dim, outputs]``, MLP down as ``Conv1D`` stores it (``[hidden, width]``), and,
with one cluster a head, q/k/v as each head's rows together. (If the kernel
is dropped, its copies stay and are refreshed all the same: ~250 MB for
gpt2-medium, a rare case not worth the bookkeeping.)
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from collapse_tui.fast.persistent import shared_memory_per_block

#: The kernel's source, compiled behind the shape's macros and ``common.cuh``.
SOURCES = Path(__file__).with_name("cuda")
#: Consumer threads a CTA at least (more where a thread must take a projection output: gpt2-large's
#: 320); one more warp streams the weights into shared memory.
THREADS = 256
#: Threads a block at most (CUDA's limit), the producer warp included.
MAX_BLOCK = 1024
#: Widest model it runs (gpt2-large; gpt2-xl's 1600 is not a multiple of 256).
MAX_WIDTH = 1280
#: Macros ``ClusterDecode`` sets from the shape (``defines`` may not).
SHAPE_MACROS = frozenset({"D", "NH", "NL", "LC", "THREADS", "CS", "NCL", "EPS", "FROM_SEQ"})
#: Layers a tag can count (cluster_decode.cu: the layer takes 6 bits of a tag).
MAX_LAYERS = 64
HEAD_DIM = 64
#: Stages a layer a ``TRACE`` build stamps (cluster_decode.cu's STAGES; benchmarks/cuda_decode.py reads them).
TRACE_STAGES = 10


def cluster_unsupported(weights: Any) -> str | None:
    """Why the cluster kernel cannot run these weights here, or ``None`` when it may (residency is checked
    when it is built)."""
    for variable in ("COLLAPSE_TUI_CLUSTER", "COLLAPSE_TUI_PERSISTENT"):
        if os.environ.get(variable, "1") == "0":
            return f"turned off by {variable}=0"
    device = weights.wte.device
    if device.type != "cuda" or torch.version.hip:
        return "needs an NVIDIA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"needs a Hopper GPU (sm_90; this one is sm_{major}{minor})"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} cannot compile CUDA at run time (torch.cuda._compile_kernel)"
    if weights.dtype != torch.bfloat16 or weights.wte.dtype != torch.float32:
        return f"needs bf16 copies of fp32 weights, not {weights.dtype} of {weights.wte.dtype}"
    width, heads = weights.n_embd, weights.n_head
    if width != heads * HEAD_DIM or width % 256 or width > MAX_WIDTH:
        return f"width {width} with {heads} heads: needs heads of {HEAD_DIM} and a width of 256, 512, ... or {MAX_WIDTH}"
    if len(weights.layers) >= MAX_LAYERS:
        return f"{len(weights.layers)} layers: the tags hold fewer than {MAX_LAYERS}"
    return None


def consumer_threads(width: int, cluster: int, least: int = THREADS) -> int:
    """The fewest consumer threads, at least ``least``, that split the width evenly (MLP down: an output a
    lane's), give every projection output of a head's share (``width / cluster``) a thread, and every
    16-byte piece of a pushed row (``width / 4``) one; whole warps, and room for the producer warp in a
    block of 1024. ``ValueError`` when no count does."""
    threads = -(-max(least, width // cluster, width // 4) // 32) * 32
    while width % threads and threads + 32 < MAX_BLOCK:
        threads += 32
    if width % threads or threads + 32 > MAX_BLOCK:
        raise ValueError(
            f"no count of at least {least} consumer threads splits a width of {width} evenly in a block of {MAX_BLOCK}"
        )
    return threads


def kernel_source(macros: dict[str, str | int]) -> str:
    """The kernel's CUDA source with ``macros`` defined in front (the shape, the options)."""
    defines = "".join(f"#define {name} {value}\n" for name, value in macros.items())
    return defines + (SOURCES / "common.cuh").read_text() + (SOURCES / "cluster_decode.cu").read_text()


@functools.cache
def compile_source(source: str, device: int, name: str = "decode_layers") -> Any:
    """The kernel ``name`` built from ``source`` by NVRTC for ``device`` (a compile takes seconds: once per
    shape)."""
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source, name)


def _max_active_clusters(kernel: Any, grid: int, block: int, shared: int) -> int | None:
    """How many of the kernel's clusters the GPU holds at once (``cuOccupancyMaxActiveClusters``), or None."""

    class LaunchConfig(ctypes.Structure):
        _fields_ = [
            *((name, ctypes.c_uint) for name in ("gx", "gy", "gz", "bx", "by", "bz", "shared")),
            ("stream", ctypes.c_void_p),
            ("attrs", ctypes.c_void_p),
            ("count", ctypes.c_uint),
        ]

    library = torch.cuda._utils._get_gpu_runtime_library()
    function = getattr(library, "cuOccupancyMaxActiveClusters", None)
    if function is None:
        return None
    clusters = ctypes.c_int(0)
    config = LaunchConfig(grid, 1, 1, block, 1, 1, shared, None, None, 0)
    if function(ctypes.byref(clusters), kernel.func, ctypes.byref(config)) != 0:
        return None
    return clusters.value


def allow_shared_memory(kernel: Any, size: int) -> None:
    """Let ``kernel`` take ``size`` bytes of dynamic shared memory (beyond the default 48 KB)."""
    if hasattr(kernel, "set_shared_memory_config"):
        kernel.set_shared_memory_config(size)
    else:  # older torch: the attribute itself (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        library = torch.cuda._utils._get_gpu_runtime_library()
        if library.cuFuncSetAttribute(kernel.func, 8, size) != 0:
            raise RuntimeError("cuFuncSetAttribute (dynamic shared memory) failed")


# The layouts of the kernel's own, each a view of a block's master weight (Conv1D stores [inputs, outputs]).


def qkv_by_head(heads: int) -> Callable[[torch.nn.Module], torch.Tensor]:
    """q/k/v as ``[head, q/k/v, dim, input]``: a head cluster's rows one block (one cluster a head)."""

    def view(block: torch.nn.Module) -> torch.Tensor:
        weight = block.attn.c_attn.weight.t()  # [q/k/v × width, input]
        return weight.view(3, heads, HEAD_DIM, weight.size(1)).transpose(0, 1)

    return view


def projection_by_rank(heads: int, cluster: int) -> Callable[[torch.nn.Module], torch.Tensor]:
    """The projection as ``[head, rank, dim, outputs]``: CTA ``rank`` of a head's cluster reads one block,
    a row of its outputs for each of the head's dimensions."""

    def view(block: torch.nn.Module) -> torch.Tensor:
        weight = block.attn.c_proj.weight  # [head × dim, outputs]
        return weight.view(heads, HEAD_DIM, cluster, weight.size(1) // cluster).transpose(1, 2)

    return view


def mlp_down_by_hidden_row(block: torch.nn.Module) -> torch.Tensor:
    """MLP down as ``[hidden, width]``: a CTA's hidden rows, each with its row of outputs."""
    return block.mlp.c_proj.weight


def ring_bytes(width: int, grid: int, cluster: int, threads: int, macros: dict[str, str]) -> int:
    """The weight ring's dynamic shared memory: ``SLOTS`` slots of the largest weight chunk.

    It mirrors cluster_decode.cu's ``SLOT`` (the launch must ask for what the kernel indexes), with the
    same rounding: q/k/v (``QRC`` rows a head CTA, or with ``SPREAD_QKV`` ``QRS`` rows in chunks of at
    most ``CHUNK_BYTES``), a head CTA's projection share, and MLP up and down in chunks of at most
    ``CHUNK_BYTES``.
    """
    slots, limit = int(macros.get("SLOTS", 3)), int(macros.get("CHUNK_BYTES", 65536))
    up_rows = -(-4 * width // grid)  # FR
    up_chunks = -(-up_rows * width * 2 // limit)  # FC
    chunk_rows = -(-up_rows // up_chunks)  # FCR
    if "SPREAD_QKV" in macros:  # QRS rows in QC chunks of QCR
        qkv_rows = -(-3 * width // grid)
        qkv_chunk = -(-qkv_rows // -(-qkv_rows * width * 2 // limit))
    else:  # QRC
        qkv_rows = qkv_chunk = min(3 * HEAD_DIM // cluster, 3 * threads // 32)
    chunks = [qkv_chunk * width, width // cluster * HEAD_DIM, chunk_rows * width]
    if "MMA_ROWS" in macros:  # whole tiles of 16 rows, MLP up two a chunk
        chunks += [-(-qkv_rows // 16) * 16 * width, min(-(-up_rows // 16), 2) * 16 * width]
    return slots * 2 * max(chunks)


class ClusterDecode:
    """The cluster kernel for one model and KV cache: its launch shape, weight layouts and buffers.

    The shape is the one that measured fastest (RESULTS.md, ninth session):
    one cluster of 8 a head where the GPU keeps that many resident (gpt2:
    12 of 8), else clusters of 4 with q/k/v spread over every CTA
    (``SPREAD_QKV``), as many as stay resident (gpt2-medium on an H200: 30).
    ``defines`` adds macros (``benchmarks/cuda_decode.py`` passes its
    diagnostic ones); ``clusters`` asks for a count instead, and
    ``least_threads`` for more consumer threads (an experiment's knob).
    """

    def __init__(
        self,
        weights: Any,
        cache: torch.Tensor,
        defines: dict[str, str] | None = None,
        clusters: int | None = None,
        from_sequence: bool = True,
        least_threads: int = THREADS,
    ) -> None:
        self.weights, self.cache, self.least_threads = weights, cache, least_threads
        self.device = cache.device
        extra = dict(defines or {})
        if set(extra) & SHAPE_MACROS:  # the launch follows the shape this class chose
            raise ValueError(f"macros {sorted(set(extra) & SHAPE_MACROS)} are the shape's, not options")
        if from_sequence:
            extra["FROM_SEQ"] = "1"
        heads, processors = (
            weights.n_head,
            torch.cuda.get_device_properties(self.device).multi_processor_count,
        )
        reasons: list[str] = []
        shapes = [(8, False), (4, True)] if "SPREAD_QKV" not in extra else [(8, True), (4, True)]
        for cluster, spread in shapes:
            macros = {**extra, "SPREAD_QKV": "1"} if spread else extra
            if not spread and clusters not in (None, heads):
                reasons.append(f"{clusters} clusters: one a head without SPREAD_QKV")
                continue
            count = clusters or (processors // cluster if spread else heads)
            if count < heads or count * cluster > processors:
                reasons.append(f"{processors} SMs do not hold {max(count, heads)} clusters of {cluster}")
                continue
            resident = self._build(cluster, count, macros)
            if spread and clusters is None and isinstance(resident, int) and heads <= resident < count:
                count = resident  # as many as fit
                resident = self._build(cluster, count, macros)
            if isinstance(resident, str):
                reasons.append(resident)
            elif resident < count:
                reasons.append(f"the GPU keeps {resident} clusters of {cluster} resident, {count} needed")
            else:
                self.spread = spread
                break
        else:
            raise RuntimeError("no cluster shape fits: " + "; ".join(reasons))
        self._lay_out_weights()
        width, device = weights.n_embd, self.device
        # tagged partials: a float and its tag (launch, layer) in one 64-bit word
        self.head_parts = torch.zeros(heads * width, dtype=torch.int64, device=device)
        self.cluster_parts = torch.zeros(self.count * width, dtype=torch.int64, device=device)
        self.qkv_parts = torch.zeros(3 * width, dtype=torch.int64, device=device)
        self.out = torch.zeros(1, width, dtype=torch.bfloat16, device=device)
        #: slot 32 counts the CTAs out, slot 40 the launches (the tags' launch count)
        self.sync = torch.zeros(64, dtype=torch.int32, device=device)
        self.error = torch.zeros(1, dtype=torch.int32, device=device)
        # TRACE: stamps [CTA][layer][stage], clocks and times [CTA][4], finer stamps [CTA][layer][4]
        layers = len(weights.layers)
        self.trace = torch.zeros(
            self.grid * (layers * TRACE_STAGES + 4 + layers * 4) if "TRACE" in extra else 1,
            dtype=torch.int64,
            device=device,
        )

    @property
    def description(self) -> str:
        spread = ", q/k/v spread" if self.spread else ""
        return f"CUDA cluster decode (one launch a token, {self.count} clusters of {self.cluster}{spread})"

    def _build(self, cluster: int, count: int, macros: dict[str, str]) -> int | str:
        """Compile for ``count`` clusters of ``cluster``: how many the GPU keeps resident, or why none fit."""
        with torch.cuda.device(self.device):  # the attributes and the occupancy query: this GPU's context
            return self._build_here(cluster, count, macros)

    def _build_here(self, cluster: int, count: int, macros: dict[str, str]) -> int | str:
        width, heads = self.weights.n_embd, self.weights.n_head
        self.cluster, self.count, self.grid = cluster, count, count * cluster
        try:
            self.threads = threads = consumer_threads(width, cluster, self.least_threads)
        except ValueError as error:
            return str(error)
        self.shared = ring_bytes(width, self.grid, cluster, threads, macros)
        up_rows = -(-4 * width // self.grid)  # FR
        # the static arrays (hs ... xs, red_*, att*, head_qkv, hidden, mbarriers): a little above ptxas's count
        static = 4 * 7 * width + 4 * (threads // 32) * HEAD_DIM + 4 * (cluster + 1) * (HEAD_DIM + 4)
        static += 2 * 3 * HEAD_DIM + 4 * HEAD_DIM + 4 * up_rows + 4 * (threads // 32) * 32 + 1024
        allowed = shared_memory_per_block(self.device)
        if allowed is not None and self.shared + static > allowed:
            return f"clusters of {cluster} need {self.shared + static} bytes of shared memory"
        shape = {
            "D": width,
            "NH": heads,
            "NL": len(self.weights.layers),
            "LC": self.cache.size(3),
            "THREADS": threads,
            "CS": cluster,
            "NCL": count,
            "EPS": f"{self.weights.eps!r}f",
        }
        try:
            self.kernel = compile_source(kernel_source({**shape, **macros}), self.device.index or 0)
        except RuntimeError as error:  # a shape the kernel's asserts refuse: the next shape may do
            return f"clusters of {cluster} do not compile ({str(error).strip().splitlines()[-1]})"
        allow_shared_memory(self.kernel, self.shared)
        resident = _max_active_clusters(self.kernel, self.grid, threads + 32, self.shared)
        if resident is None:  # without the driver's answer the polls could wait on clusters never started
            return "the driver cannot say how many clusters fit (cuOccupancyMaxActiveClusters)"
        return resident

    def _lay_out_weights(self) -> None:
        """The weights as the kernel reads them: copies in ``GPT2Weights`` where the layout is its own."""
        w, heads, cluster = self.weights, self.weights.n_head, self.cluster
        # with SPREAD_QKV the q/k/v rows are split over every CTA: the plain rows
        self.wq = w.qkv_w_all if self.spread else w.layout_copy("qkv by head", qkv_by_head(heads))
        self.wp = w.layout_copy(f"projection by rank of {cluster}", projection_by_rank(heads, cluster))
        self.wf = w.fc_w_all
        self.wd = w.layout_copy("MLP down by hidden row", mlp_down_by_hidden_row)

    def run(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``ln_f`` of the token at ``position`` [1] (int64, on the device), ``[1, n_embd]`` bf16; its key and
        value go into the cache. The token is ``tokens[position]`` (the sequence, the engine's way) or, built
        with ``from_sequence=False``, ``tokens[0]``."""
        w = self.weights
        with torch.cuda.device(self.device):
            self.kernel(
                grid=(self.grid, 1, 1),
                block=(self.threads + 32, 1, 1),
                shared_mem=self.shared,
                args=[
                    tokens, position, w.wte, w.wpe, self.wq, w.qkv_b_all, self.wp, w.proj_b_all, self.wf,
                    w.fc_b_all, self.wd, w.out_b_all, w.ln1_w_all, w.ln1_b_all, w.ln2_w_all, w.ln2_b_all,
                    self.cache, self.head_parts, self.cluster_parts, self.qkv_parts, self.out, self.sync,
                    self.error, self.trace,
                ],
            )  # fmt: skip
        return self.out

    def run_sequence(self, seq: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
        """The cached step's forward: the token ``seq[counter]`` at position ``counter`` (as ``PersistentForward``)."""
        return self.run(seq, counter)

    def failed(self) -> bool:
        """Whether a poll gave up since the buffers were made (one host sync): the results are not to be trusted."""
        return bool(int(self.error.item()))

    def check(self) -> None:
        """Raise if a poll gave up or the last launch did not count every CTA out (host sync: tests only)."""
        if self.failed():
            raise RuntimeError("a poll of the cluster decode kernel timed out")
        if int(self.sync[32]) != 0:
            raise RuntimeError(f"{int(self.sync[32])} CTAs counted out, not reset by the last one")
