"""The CUDA cluster kernel's side that runs without a GPU: its weight layouts and where it declines.

The kernel itself runs only on a Hopper GPU (tests/test_fast_gpu.py). Its
layouts are views of the master weights that ``GPT2Weights`` copies and
refreshes; here they are checked against the index arithmetic of the
ninth session's prototype (benchmarks/cuda_decode.py at d26e744), whose
results matched the layer-by-layer forward on an H200.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from collapse_tui.fast.cluster import (
    HEAD_DIM,
    ClusterDecode,
    cluster_unsupported,
    consumer_threads,
    kernel_source,
    mlp_down_by_hidden_row,
    projection_by_rank,
    qkv_by_head,
    ring_bytes,
)
from collapse_tui.fast.gpt2 import GPT2Weights

LAYERS, HEADS, WIDTH = 3, 4, 4 * HEAD_DIM


@pytest.fixture
def weights() -> GPT2Weights:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=64, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH)
    return GPT2Weights(GPT2LMHeadModel(config).eval(), torch.bfloat16)


def test_qkv_by_head_puts_each_heads_rows_together(weights: GPT2Weights) -> None:
    wq = weights.layout_copy("qkv by head", qkv_by_head(HEADS))
    index = torch.arange(3 * HEAD_DIM)
    rows = (index // HEAD_DIM) * WIDTH + index % HEAD_DIM  # the prototype's: q, k, v of head 0 ...
    rows = (rows.view(1, -1) + HEAD_DIM * torch.arange(HEADS).view(-1, 1)).flatten()  # ... then of head 1 ...
    assert torch.equal(wq.reshape(LAYERS, 3 * WIDTH, WIDTH), weights.qkv_w_all[:, rows, :])


@pytest.mark.parametrize("cluster", [4, 8])
def test_projection_by_rank_gives_each_cta_one_block(weights: GPT2Weights, cluster: int) -> None:
    wp = weights.layout_copy(f"projection by rank of {cluster}", projection_by_rank(HEADS, cluster))
    expected = weights.proj_w_all.view(LAYERS, cluster, WIDTH // cluster, HEADS, HEAD_DIM).permute(
        0, 3, 1, 4, 2
    )
    assert torch.equal(wp, expected)  # [layer, head, rank, dim, outputs]


def test_mlp_down_by_hidden_row_is_the_transposed_copy(weights: GPT2Weights) -> None:
    wd = weights.layout_copy("MLP down by hidden row", mlp_down_by_hidden_row)
    assert torch.equal(wd, weights.out_w_all.transpose(1, 2))


def test_layout_copies_follow_the_masters_and_are_made_once(weights: GPT2Weights) -> None:
    """The optimizer updates the fp32 masters; the kernel's copies must follow at the next refresh."""
    bytes_per_token, copies = weights.nbytes_per_token, len(weights.masters)
    wd = weights.layout_copy("MLP down by hidden row", mlp_down_by_hidden_row)
    assert not weights.stale()  # filled when made
    assert weights.layout_copy("MLP down by hidden row", mlp_down_by_hidden_row) is wd
    assert len(weights.masters) == copies + LAYERS  # one slice a layer, once
    assert weights.nbytes_per_token == bytes_per_token  # read instead of out_w_all, not besides it
    master = weights._blocks[1].mlp.c_proj.weight
    with torch.no_grad():
        master.mul_(-2.0)
    before = wd[1].clone()
    weights.refresh()
    assert torch.equal(wd[1], master.to(torch.bfloat16))
    assert torch.equal(wd[1], (-2.0 * before.float()).to(torch.bfloat16))


def test_it_declines_without_a_hopper_gpu(weights: GPT2Weights, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cluster_unsupported(weights) == "needs an NVIDIA GPU"  # these weights are on the CPU
    monkeypatch.setenv("COLLAPSE_TUI_CLUSTER", "0")
    assert cluster_unsupported(weights) == "turned off by COLLAPSE_TUI_CLUSTER=0"


def test_the_shape_is_not_an_option(weights: GPT2Weights) -> None:
    """The launch follows the shape the class chose, so ``defines`` cannot change it (checked before any CUDA call)."""
    with pytest.raises(ValueError, match="the shape's"):
        ClusterDecode(weights, weights.new_kv_cache(16), defines={"CS": "4"})


def test_the_source_defines_the_shape_before_the_kernel() -> None:
    source = kernel_source({"D": 1024, "NH": 16, "FROM_SEQ": 1})
    assert source.startswith("#define D 1024\n#define NH 16\n#define FROM_SEQ 1\n")
    assert source.index("#define HD 64") < source.index("decode_layers(")  # common.cuh, then the kernel


@pytest.mark.parametrize(
    ("width", "cluster", "threads"), [(768, 8, 256), (1024, 4, 256), (1280, 4, 320), (1280, 8, 320)]
)
def test_consumer_threads_meet_the_kernels_asserts(width: int, cluster: int, threads: int) -> None:
    """An MLP-down output a lane's (width a multiple of the threads), a thread for each projection output of
    a head's share and for each 16-byte piece of a pushed row."""
    chosen = consumer_threads(width, cluster)
    assert chosen == threads
    assert width % chosen == 0 and chosen >= width // cluster and chosen >= width // 4


@pytest.mark.parametrize(
    ("width", "least", "threads"),
    [(768, 384, 384), (1024, 384, 512), (1280, 512, 640), (768, 100, 192)],
)
def test_consumer_threads_asked_for_more(width: int, least: int, threads: int) -> None:
    """``least`` (cuda_decode.py's THREADS=N) raises the count to the next that still splits the width
    evenly: 384 divides 768, not 1024 (512) or 1280 at 512 (640); asked for fewer than the default, the
    width's own floor holds (768 / 4 pushed pieces: 192)."""
    assert consumer_threads(width, 4, least) == threads


def test_consumer_threads_refuse_what_no_block_holds() -> None:
    """600 threads or more do not split 1024 in a block of 1024 with the producer warp: refused, not a
    search without end (cuda_decode.py's THREADS=600 then gets a refused row)."""
    with pytest.raises(ValueError, match="1024"):
        consumer_threads(1024, 4, 600)
    with pytest.raises(ValueError, match="block of 1024"):
        consumer_threads(1024, 4, 1024)  # divides the width, but leaves no room for the producer warp
    assert consumer_threads(1280, 4, 330) == 640  # whole warps (352), then the first that divides 1280


@pytest.mark.parametrize(
    ("width", "grid", "cluster", "threads", "macros", "expected"),
    [
        # gpt2: 12 clusters of 8, a head CTA's 24 q/k/v rows; MLP up 32 rows of 768 in one chunk (the largest)
        (768, 96, 8, 256, {}, 3 * 2 * 32 * 768),
        # gpt2-medium: 30 clusters of 4, 26 spread q/k/v rows in one 52 KB chunk (the largest)
        (1024, 120, 4, 256, {"SPREAD_QKV": "1"}, 3 * 2 * 26 * 1024),
        # ... in chunks of at most 36 KB: q/k/v 2 x 13 rows, MLP up 2 x 18 rows (the largest), 5 slots
        (1024, 120, 4, 256, {"SPREAD_QKV": "1", "SLOTS": "5", "CHUNK_BYTES": "36864"}, 5 * 2 * 18 * 1024),
        # gpt2-large: 32 spread q/k/v rows in 2 chunks of 16; MLP up 43 rows in 2 chunks of up to 22 (the largest)
        (1280, 120, 4, 320, {"SPREAD_QKV": "1"}, 3 * 2 * 22 * 1280),
    ],
)
def test_ring_bytes_are_the_slots_of_the_largest_chunk(
    width: int, grid: int, cluster: int, threads: int, macros: dict[str, str], expected: int
) -> None:
    assert ring_bytes(width, grid, cluster, threads, macros) == expected
