"""A cached GPT-2 token in hand-written CUDA against the engine's Triton kernel.

    python benchmarks/cuda_decode.py --models gpt2-medium,gpt2 --positions 100,511,1000
    python benchmarks/cuda_decode.py --kernel cluster --models gpt2 --clusters 12
    python benchmarks/cuda_decode.py --kernel cluster --models gpt2-medium --defines SPREAD_QKV
    python benchmarks/cuda_decode.py --models gpt2-medium --variants ";NORM_ONCE=0" --rounds 7

``--kernel five`` (cuda_decode.cu, a prototype the engine does not use) asks
whether a persistent kernel written in CUDA, each stage near its own floor,
makes a layer much shorter than the Triton decode kernel's: it did not
(RESULTS.md, eighth session: 23.3 µs a gpt2-medium layer against Triton's
22.6), since a layer is a chain of five grid-wide hand-offs. ``--kernel
cluster`` is the engine's cached step on Hopper GPUs
(collapse_tui/fast/cluster.py and cuda/cluster_decode.cu): thread block
clusters that push into each other's shared memory, and partials that carry
their own tag, no grid barrier (RESULTS.md, ninth session: 17.0 µs a
gpt2-medium layer, 13.0 for gpt2, against Triton's 22.4 and 19.3); here with
the diagnostic macros (``--defines TRACE``, ``NO_COPY``, ``MMA_ROWS``, ...)
and cluster counts the engine does not choose (without ``SPREAD_QKV`` the shape is
the engine's: one cluster of 8 a head where that many fit, else clusters of
4 with q/k/v spread, which the printed label says). ``--variants`` builds the
cluster kernel several ways and times the builds in turns in one process: the
fairest comparison, since separate calls of one build differ by 1-2 %. Both
kernels are compiled at run time by NVRTC (``torch.cuda._compile_kernel``), the
shape as macros; on a Hopper GPU (the five-barrier prototype: gpt2 and
gpt2-medium only).

For each model and position it checks the CUDA kernel against the
layer-by-layer forward (``GPT2Weights.decode_one``, fp32 accumulation over
bf16 weights), with biases and layer-norm parameters randomised so that a
missing one shows: the logits' largest difference, next to the Triton
kernel's, and the key/value row written into the cache. Then it times
both kernels and the layer-by-layer forward by CUDA graph replay
(benchmarks/timing.py), µs a token without lm_head and sampling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_iteration import SHAPES, build_model, copy_bandwidth
from mma_layout import blocks_of_rows
from timing import graph_time

from collapse_tui.fast import cluster
from collapse_tui.fast.cluster import HEAD_DIM, TRACE_STAGES, ClusterDecode
from collapse_tui.fast.gpt2 import GPT2Weights
from collapse_tui.fast.persistent import PersistentForward

COMMON = cluster.SOURCES / "common.cuh"  # compiled in front of the five-barrier kernel too
SOURCE = Path(__file__).with_name("cuda_decode.cu")
CACHE_LENGTH = 1024
CHUNK = 128  # keys an attention item covers (cuda_decode.cu's CH)


class CudaDecode:
    """The CUDA kernel for one shape, its buffers, and a launch that reads token and position on the device."""

    def __init__(
        self, weights: GPT2Weights, cache: torch.Tensor, threads: int, extra: dict[str, str]
    ) -> None:
        self.weights, self.cache, self.threads = weights, cache, threads
        width, heads, layers = weights.n_embd, weights.n_head, len(weights.layers)
        properties = torch.cuda.get_device_properties(0)
        self.grid = properties.multi_processor_count
        if width % 256 or CHUNK % (threads // 32 * 4) or threads < HEAD_DIM:
            raise SystemExit(
                f"cuda_decode: width {width} with {threads} threads is not supported: "
                "the width must be a multiple of 256, the threads 64, 128, 256 or 512"
            )
        defines = {
            "D": width,
            "NH": heads,
            "NL": layers,
            "LC": cache.size(3),
            "GRID": self.grid,
            "THREADS": threads,
            **extra,
        }
        source = (
            "".join(f"#define {k} {v}\n" for k, v in defines.items())
            + COMMON.read_text()
            + SOURCE.read_text()
        )
        self.kernel = cluster.compile_source(source, torch.cuda.current_device())
        # the ring of three weight slots in dynamic shared memory (cuda_decode.cu's SLOT)
        warps = self.grid * threads // 32
        rows = [-(-n // warps) for n in (3 * width, 4 * width, width)]
        slot = max(
            threads // 32 * rows[0] * width,
            threads // 32 * rows[1] * width,
            threads // 32 * rows[2] * 4 * width,
        )
        self.shared = 3 * slot * 2
        # the kernel's static shared memory: xs, hs, gs, bs (fp32 rows), red_m, red_l, red_o, the mbarriers
        static = 4 * (4 * width + 3 * width) + 4 * (threads // 32) * (HEAD_DIM + 2) + 64
        allowed = getattr(properties, "shared_memory_per_block_optin", None)  # not in every torch
        if allowed is not None and self.shared + static > allowed:
            raise SystemExit(
                f"cuda_decode: the weight ring needs {self.shared + static} bytes of shared memory a block, "
                f"the GPU allows {allowed}"
            )
        cluster.allow_shared_memory(self.kernel, self.shared)
        device = weights.wte.device
        chunks = -(-cache.size(3) // CHUNK)
        self.h = torch.zeros(width, device=device)
        self.qkv = torch.zeros(3 * width, dtype=torch.bfloat16, device=device)
        self.part = torch.zeros(heads * chunks * (HEAD_DIM + 2), device=device)
        self.ff = torch.zeros(4 * width, dtype=torch.bfloat16, device=device)
        self.out = torch.zeros(1, width, dtype=torch.bfloat16, device=device)
        self.sync = torch.zeros(64, dtype=torch.int32, device=device)
        self.error = torch.zeros(1, dtype=torch.int32, device=device)

    def run(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``ln_f`` of ``token`` [1] at ``position`` [1] (int64, on the device), ``[1, n_embd]`` bf16."""
        w = self.weights
        self.kernel(
            grid=(self.grid, 1, 1),
            block=(self.threads + 32, 1, 1),  # and the producer warp
            shared_mem=self.shared,
            args=[
                token, position, w.wte, w.wpe, w.qkv_w_all, w.qkv_b_all, w.proj_w_all, w.proj_b_all,
                w.fc_w_all, w.fc_b_all, w.out_w_all, w.out_b_all, w.ln1_w_all, w.ln1_b_all, w.ln2_w_all,
                w.ln2_b_all, self.cache, self.h, self.qkv, self.part, self.ff, self.out, self.sync, self.error,
            ],
        )  # fmt: skip
        return self.out


def cluster_decode(
    weights: GPT2Weights, cache: torch.Tensor, extra: dict[str, str], clusters: int | None
) -> ClusterDecode:
    """The engine's cluster kernel (collapse_tui/fast/cluster.py) with this script's macros, fed ``token`` [1].

    What the kernel would refuse is said here in one line. ``MMA_ROWS`` takes
    q/k/v and MLP up as tensor-core fragments (mma_layout.py), laid out here
    (the engine never builds it). ``THREADS=N`` is not passed as a macro (the
    shape's own): it asks for at least N consumer threads.
    """
    extra = dict(extra)
    least_threads = int(extra.pop("THREADS", cluster.THREADS))
    heads = weights.n_head
    spread = "SPREAD_QKV" in extra
    if clusters is not None and (clusters < heads or (clusters > heads and not spread)):
        raise SystemExit(f"cuda_decode: --clusters {clusters}: {heads} (one a head), or more with SPREAD_QKV")
    if "MMA_ROWS" in extra and not spread:
        raise SystemExit("cuda_decode: MMA_ROWS takes SPREAD_QKV's q/k/v rows: add SPREAD_QKV")
    try:
        decode = ClusterDecode(
            weights, cache, extra, clusters, from_sequence=False, least_threads=least_threads
        )
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"cuda_decode: {error}") from None
    if "MMA_ROWS" in extra:
        with torch.no_grad():
            decode.wq = blocks_of_rows(weights.qkv_w_all, decode.grid).contiguous()
            decode.wf = blocks_of_rows(weights.fc_w_all, decode.grid).contiguous()
    return decode


def report_trace(decode: ClusterDecode, layers: int) -> None:
    """Where a layer's time goes, from the TRACE build's clock stamps (one launch): µs a stage."""
    stages = TRACE_STAGES
    trace = decode.trace.cpu()
    grid = decode.grid
    heads = decode.weights.n_head * decode.cluster  # the head clusters' CTAs: the chain runs through them
    stamps = trace[: grid * layers * stages].view(grid, layers, stages)[:heads].double()
    ends = trace[grid * layers * stages : grid * (layers * stages + 4)].view(grid, 4)[:heads].double()
    finer = trace[grid * (layers * stages + 4) :].view(grid, layers, 4)[:heads].double()
    grid = heads
    per_cycle = (ends[:, 3] - ends[:, 2]) / (ends[:, 1] - ends[:, 0]) / 1000  # µs a cycle, per CTA
    # stage k's time: stamp k - stamp k-1; stage 0's: the next layer's stamp 0 - this layer's stamp 9
    times = torch.empty(grid, layers - 1, stages, dtype=torch.float64)
    times[:, :, 1:] = stamps[:, :-1, 1:] - stamps[:, :-1, :-1]
    times[:, :, 0] = stamps[:, 1:, 0] - stamps[:, :-1, stages - 1]
    times *= per_cycle.view(-1, 1, 1)
    names = ["clusters summed", "ln_1 + qkv", "meet 0 + gather", "attention", "meet 1 + combine",
             "projection", "heads summed", "ln_2 + up", "down", "meet 2 + in cluster"]  # fmt: skip
    mean = times.mean(dim=(0, 1))
    worst = times.mean(dim=1).max(dim=0).values
    print(
        f"trace (µs a layer, mean over the {layers - 1} layer-to-layer steps; "
        "mean over the head clusters' CTAs / the slowest's mean):"
    )
    for index in [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]:
        print(f"  {names[index]:>18}: {mean[index]:6.2f} / {worst[index]:6.2f}")
    print(f"  {'layer':>18}: {mean.sum():6.2f}")
    # inside ln_2 + MLP up (CTA thread 0's warp): the norm, the wait for the first chunk, the rows, the CTA's sync
    marks = torch.cat([stamps[:, :-1, 6:7], finer[:, :-1, :3], stamps[:, :-1, 7:8]], dim=2)
    parts = (marks[:, :, 1:] - marks[:, :, :-1]) * per_cycle.view(-1, 1, 1)
    print(
        "  ln_2 + up, inside: "
        + ", ".join(
            f"{name} {value:.2f}"
            for name, value in zip(
                ["norm", "first chunk", "rows", "sync"], parts.mean(dim=(0, 1)), strict=True
            )
        )
    )


def report_every_cta(decode: ClusterDecode, layers: int) -> None:
    """What a layer waits for, from every CTA's stamps: each stage's end after the layer's start, per CTA.

    A CTA's clock runs on its own SM, so stamps are compared only within a CTA; a layer's start
    (stamp 0) follows the tagged sum of every cluster's partial, which all CTAs see within an L2 round
    trip, so offsets from it line the CTAs up to about that (layer 0, whose start follows the launch,
    is left out). Clusters without a head skip stages 1-4: their stamp 5 ends their q/k/v rows.
    """
    stages, grid, size = TRACE_STAGES, decode.grid, decode.cluster
    trace = decode.trace.cpu()
    stamps = trace[: grid * layers * stages].view(grid, layers, stages).double()
    ends = trace[grid * layers * stages : grid * (layers * stages + 4)].view(grid, 4).double()
    per_cycle = ((ends[:, 3] - ends[:, 2]) / (ends[:, 1] - ends[:, 0]) / 1000).view(-1, 1, 1)
    steps = layers - 2  # layers 1 .. NL - 2: each ends at the next one's start
    start = stamps[:, 1:-1, :1]
    offsets = torch.cat([stamps[:, 1:-1, 1:], stamps[:, 2:, :1]], dim=2) - start  # stages 1..9, next layer
    offsets = offsets * per_cycle  # µs after the layer's start: [CTA][layer][stage 1..9, layer end]
    heads = decode.weights.n_head * size
    names = ["ln_1 + qkv", "meet 0 + gather", "attention", "meet 1 + combine", "projection",
             "heads summed", "ln_2 + up", "down", "meet 2 + in cluster", "layer end"]  # fmt: skip
    print(
        "every CTA: µs after the layer's start, mean over layers; mean / latest CTA, head clusters | others"
    )
    for k, name in enumerate(names):
        head = offsets[:heads, :, k]
        line = f"  {name:>20}: {head.mean():6.2f} / {head.max(dim=0).values.mean():6.2f}"
        if heads < grid:  # the others: their rows end at stamp 5 (k = 4); stages 1-4 are not theirs
            other = offsets[heads:, :, 4 if k == 0 else k]
            idle = 1 <= k <= 4
            line += (
                " |   (idle)" if idle else f" | {other.mean():6.2f} / {other.max(dim=0).values.mean():6.2f}"
            )
        print(line)
    # the cluster whose partial is stored last (stage 9) each layer: where the layer waits
    stored = offsets[:, :, 8].view(grid // size, size, steps).max(dim=1).values  # [cluster][layer]
    last = stored.argmax(dim=0)
    counts = torch.bincount(last, minlength=grid // size)
    order = counts.argsort(descending=True)[:6]
    print(
        "  last cluster to store its partial (layers it was last, its mean store time µs, all clusters' mean): "
        + ", ".join(f"#{int(c)} {int(counts[c])}x {stored[c].mean():.2f}" for c in order)
        + f"; mean {stored.mean():.2f}, mean latest {stored.max(dim=0).values.mean():.2f}"
    )
    down = offsets[:, :, 7]  # MLP down done, per CTA (thread 0's warp)
    slow = down.mean(dim=1).argsort(descending=True)[:6]
    print(
        "  slowest CTAs to finish MLP down (CTA: mean µs): "
        + ", ".join(f"{int(b)}: {down[b].mean():.2f}" for b in slow)
        + f"; all CTAs' mean {down.mean():.2f}"
    )


def randomise_small_parameters(model: torch.nn.Module) -> None:
    """Biases and layer-norm parameters away from 0 and 1, so a kernel that drops one is caught."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.device)
            if name.endswith("bias"):
                parameter.add_(0.02 * noise)
            elif ".ln_" in name and name.endswith("weight"):
                parameter.add_(0.1 * noise)


def prepared_weights(name: str) -> GPT2Weights:
    """A random-weight model of ``name``'s shape, biases and norms randomised, as bf16 kernel weights."""
    model = build_model(name)
    randomise_small_parameters(model)
    weights = GPT2Weights(model, torch.bfloat16)
    weights.refresh()
    return weights


def cached_positions(
    weights: GPT2Weights, positions: list[int]
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each position: it, its token [1], the position [1] on the device, the layer-by-layer
    forward's mask, and a KV cache holding the keys and values of every earlier token (clone it
    before a kernel writes its row)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, 50257, (max(positions) + 1,), device="cuda", generator=generator)
    base = weights.new_kv_cache(CACHE_LENGTH)
    weights.hidden(tokens[: max(positions)].view(1, -1), base)  # the prompt's keys and values
    for position in positions:
        mask = torch.zeros(1, 1, 1, CACHE_LENGTH, device="cuda", dtype=torch.bfloat16)
        mask[..., position + 1 :] = float("-inf")
        yield position, tokens[position : position + 1], torch.tensor([position], device="cuda"), mask, base


def check_and_time(
    name: str,
    positions: list[int],
    threads: int,
    extra: dict[str, str],
    bandwidth: float,
    kernel: str,
    clusters: int | None,
) -> None:
    weights = prepared_weights(name)
    layer_bytes = weights.nbytes_per_token - weights.lm_head.numel() * weights.lm_head.element_size()
    floor = layer_bytes / bandwidth * 1e6
    layers = len(weights.layers)
    with torch.no_grad():
        for position, token, where, mask, base in cached_positions(weights, positions):
            caches = {k: base.clone() for k in ("reference", "cuda", "triton")}
            reference = weights.decode_one(token, where, caches["reference"], mask).float()
            if kernel == "cluster":
                cuda = cluster_decode(weights, caches["cuda"], extra, clusters)
            else:
                cuda = CudaDecode(weights, caches["cuda"], threads, extra)
            triton = PersistentForward(weights, 1, cache=caches["triton"])
            cuda_logits = weights.logits(cuda.run(token, where)).float()
            triton_logits = weights.logits(triton.run(token, where)[:1]).float()
            torch.cuda.synchronize()
            failed = int(cuda.error.item())
            cuda_error = (cuda_logits - reference).abs().max().item()
            triton_error = (triton_logits - reference).abs().max().item()
            kv_error = (
                (caches["cuda"][:, :, :, position] - caches["reference"][:, :, :, position])
                .abs()
                .max()
                .item()
            )
            scale = reference.abs().max().item()
            times = {
                "cuda": graph_time([lambda c=cuda, t=token, p=where: c.run(t, p)]),
                "triton": graph_time([lambda f=triton, t=token, p=where: f.run(t, p)]),
                "layered": graph_time(
                    [lambda t=token, p=where, c=caches["reference"], m=mask: weights.decode_one(t, p, c, m)]
                ),
            }
            failed |= int(cuda.error.item())
            if "TRACE" in extra and isinstance(cuda, ClusterDecode):
                cuda.run(token, where)
                torch.cuda.synchronize()
                report_trace(cuda, layers)
                report_every_cta(cuda, layers)
            label = ""
            if isinstance(cuda, ClusterDecode):  # its shape, as in the engine's description, and threads
                label = f" ({cuda.count} clusters of {cuda.cluster}, {cuda.threads} threads{', q/k/v spread' if cuda.spread else ''})"
            print(
                f"| {name}{label} | {position} | {times['cuda']:.1f} ({times['cuda'] / layers:.2f} a layer) "
                f"| {times['triton']:.1f} ({times['triton'] / layers:.2f}) | {times['layered']:.1f} | {floor:.1f} "
                f"| {cuda_error:.4f} / {triton_error:.4f} of {scale:.2f} | {kv_error:.4f} "
                f"| {'A BARRIER OR POLL GAVE UP' if failed else 'ok'} |",
                flush=True,
            )


def parse_defines(text: str) -> dict[str, str]:
    """``NAME`` or ``NAME=VALUE`` items, comma-separated, as macros (a bare name is defined as 1)."""
    macros = dict([*item.split("="), "1"][:2] for item in filter(None, text.split(",")))
    empty = [name for name, value in macros.items() if not value]
    if empty:  # "NAME=" would define an empty macro, which the kernel's #if lines cannot read
        raise SystemExit(f"cuda_decode: give {', '.join(empty)} a value (NAME=VALUE) or none (NAME)")
    return macros


def variant_label(variant: dict[str, str]) -> str:
    """A build's macros as the table names it."""
    return ",".join(f"{k}={v}" for k, v in variant.items()) or "(base)"


def compare_variants(
    name: str,
    positions: list[int],
    extra: dict[str, str],
    variants: list[dict[str, str]],
    clusters: int | None,
    rounds: int,
) -> None:
    """The cluster kernel built with each variant's macros (over ``extra``), checked against the
    layer-by-layer forward, then timed in turns: every variant once a round, ``rounds`` rounds, the
    median of each variant's rounds printed. Turns in one process keep the machine's drift out of the
    comparison, which separate calls (1-2 % apart for the same build) do not."""
    weights = prepared_weights(name)
    layers = len(weights.layers)
    with torch.no_grad():
        for position, token, where, mask, base in cached_positions(weights, positions):
            reference = weights.decode_one(token, where, base.clone(), mask).float()
            built: list[tuple[dict[str, str], ClusterDecode]] = []
            for variant in variants:  # a build the kernel refuses is said in a row, and the others go on
                try:
                    built.append(
                        (variant, cluster_decode(weights, base.clone(), {**extra, **variant}, clusters))
                    )
                except SystemExit as refusal:
                    print(f"| {name} | {position} | {variant_label(variant)} | refused: {refusal} | | | |")
            kept, builds = [v for v, _ in built], [b for _, b in built]
            errors = [
                (weights.logits(b.run(token, where)).float() - reference).abs().max().item() for b in builds
            ]
            samples: list[list[float]] = [[] for _ in builds]
            for turn in range(rounds):  # each round starts one build later: no build always goes first
                for index in [(turn + i) % len(builds) for i in range(len(builds))]:
                    build = builds[index]
                    samples[index].append(graph_time([lambda b=build, t=token, p=where: b.run(t, p)]))
            for variant, build, error, times in zip(kept, builds, errors, samples, strict=True):
                median = sorted(times)[len(times) // 2]
                failed = "A BARRIER OR POLL GAVE UP" if build.failed() else "ok"
                print(
                    f"| {name} | {position} | {variant_label(variant)} ({build.threads} threads) "
                    f"| {median:.1f} ({median / layers:.2f} a layer) "
                    f"| {min(times):.1f}–{max(times):.1f} | {error:.4f} | {failed} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2-medium,gpt2")
    parser.add_argument("--positions", default="100,511,1000")
    parser.add_argument(
        "--threads",
        type=int,
        default=256,
        help="five kernel: threads a CTA (the cluster kernel picks its own)",
    )
    parser.add_argument(
        "--clusters",
        type=int,
        default=None,
        help="cluster kernel: how many clusters (at least one a head; default: as many as the GPU keeps resident)",
    )
    parser.add_argument(
        "--kernel",
        choices=("five", "cluster"),
        default="five",
        help="five: cuda_decode.cu (five grid barriers a layer); cluster: the engine's cluster kernel (none)",
    )
    parser.add_argument(
        "--defines",
        default="",
        help="more macros, comma-separated, NAME or NAME=VALUE: e.g. PACE=0, or NO_COPY for diagnosis",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="the cluster kernel (whatever --kernel says) built several ways, compared in turns: builds "
        "separated by ';', each a --defines list (empty: the base build), e.g. ';NORM_ONCE=0;SLOTS=5,CHUNK_BYTES=36864'",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="--variants: timing rounds, every build once a round"
    )
    args = parser.parse_args()
    positions = [int(p) for p in args.positions.split(",")]
    if not all(0 < p < CACHE_LENGTH for p in positions):
        raise SystemExit(f"cuda_decode: positions must lie in 1..{CACHE_LENGTH - 1}")
    extra = parse_defines(args.defines)
    if args.variants is not None:
        variants = [parse_defines(text) for text in args.variants.split(";")]
        print(
            f"{torch.cuda.get_device_name()}; cluster kernel builds in turns, {args.rounds} rounds; {extra or 'no common macros'}"
        )
        print(
            "| model | position | build | µs a token, median of rounds | rounds' range | logits' largest difference | polls |"
        )
        print("| --- | ---: | --- | ---: | --- | ---: | --- |")
        for name in args.models.split(","):
            assert name in SHAPES, f"unknown model {name}"
            compare_variants(name, positions, extra, variants, args.clusters, args.rounds)
            torch.cuda.empty_cache()
        return
    bandwidth = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; {args.kernel} kernel; {args.threads} threads a CTA; {extra or 'no extra macros'}"
    )
    print(
        "| model | position | CUDA µs a token | Triton µs | layer by layer µs | layers' floor µs "
        "| logits' largest difference from layer by layer, CUDA / Triton | cache row's | barriers and polls |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for name in args.models.split(","):
        assert name in SHAPES, f"unknown model {name}"
        check_and_time(name, positions, args.threads, extra, bandwidth, args.kernel, args.clusters)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
