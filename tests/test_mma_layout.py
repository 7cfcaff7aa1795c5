"""benchmarks/mma_layout.py: weights stored as mma.m16n8k16 A fragments, rebuilt lane by lane.

The rebuild follows the PTX ISA's table for the bf16 A fragment, written out
here register by register (not through the module's index tensors), so a
layout that a warp would misread fails here, on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from mma_layout import as_fragments, blocks_of_rows


def rebuild_tile(fragment: torch.Tensor) -> torch.Tensor:
    """The 16 x 16 tile that 32 lanes' fragments [32, 8] make, by the PTX table: registers a0..a3 of
    lane 4 g + t hold (g, 2t..2t+1), (g+8, 2t..2t+1), (g, 2t+8..2t+9), (g+8, 2t+8..2t+9)."""
    tile = torch.full((16, 16), float("nan"), dtype=fragment.dtype)
    for lane in range(32):
        g, t = divmod(lane, 4)
        places = [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]
        for register, (row, column) in enumerate(places):
            tile[row, column] = fragment[lane, 2 * register]
            tile[row, column + 1] = fragment[lane, 2 * register + 1]
    return tile


def test_fragments_rebuild_every_tile_exactly() -> None:
    rows = torch.randn(32, 48)
    fragments = as_fragments(rows)
    assert fragments.shape == (2, 3, 32, 8)
    for m in range(2):
        for k in range(3):
            rebuilt = rebuild_tile(fragments[m, k])
            assert not rebuilt.isnan().any(), "a place no lane fills"
            assert torch.equal(rebuilt, rows[16 * m : 16 * m + 16, 16 * k : 16 * k + 16])


def test_products_from_fragments_match_the_rows() -> None:
    """What the kernel sums, tile by tile over K, is the rows times the vector."""
    rows, vector = torch.randn(48, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    fragments = as_fragments(rows)
    product = torch.zeros(48, dtype=torch.float64)
    for m in range(3):
        for k in range(4):
            product[16 * m : 16 * m + 16] += rebuild_tile(fragments[m, k]) @ vector[16 * k : 16 * k + 16]
    torch.testing.assert_close(product, rows @ vector)


def test_blocks_of_rows_split_unevenly_and_pad_with_zeros() -> None:
    weights = torch.randn(2, 35, 32)  # two layers, 35 rows: blocks of 11, 12, 12 (b 35 / 3 ..)
    blocks = blocks_of_rows(weights, 3)
    assert blocks.shape == (2, 3, 1, 2, 32, 8)  # 12 rows pad to one tile of 16
    for layer in range(2):
        for b, (first, last) in enumerate([(0, 11), (11, 23), (23, 35)]):
            tile = torch.cat([rebuild_tile(blocks[layer, b, 0, k]) for k in range(2)], dim=1)
            assert torch.equal(tile[: last - first], weights[layer, first:last])
            assert torch.equal(tile[last - first :], torch.zeros(16 - (last - first), 32))
