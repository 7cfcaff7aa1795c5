"""Weights laid out as tensor-core fragments, for the cluster kernel's MMA_ROWS products (collapse_tui/fast/cuda/cluster_decode.cu).

``mma.sync.m16n8k16`` with bf16 operands takes its 16 x 16 A tile from
the 32 lanes of a warp, 8 values a lane (PTX ISA, "Matrix Fragments for
mma.m16n8k16"): lane L = 4 g + t holds rows g and g + 8, columns 2t, 2t + 1,
2t + 8 and 2t + 9, in the register order

    (g, 2t) (g, 2t+1) | (g+8, 2t) (g+8, 2t+1) | (g, 2t+8) (g, 2t+9) | (g+8, 2t+8) (g+8, 2t+9)

Stored in that order, tile after tile, a lane's fragment is one 16-byte
load from shared memory and a warp's loads touch 512 consecutive bytes: no
bank conflicts and no ``ldmatrix``, from a plain bulk copy of the block.
This module has no GPU code; tests/test_mma_layout.py checks it against the
mapping above by rebuilding each tile from its fragments.
"""

from __future__ import annotations

import torch

TILE = 16


def fragment_index() -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column, within a 16 x 16 tile, of each lane's 8 values: two ``[32, 8]`` tensors."""
    lane = torch.arange(32).view(32, 1)
    group, thread = lane // 4, lane % 4
    pair = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]).view(1, 8)
    row_high = torch.tensor([0, 0, 8, 8, 0, 0, 8, 8]).view(1, 8)
    column_high = torch.tensor([0, 0, 0, 0, 8, 8, 8, 8]).view(1, 8)
    return group + row_high, 2 * thread + pair + column_high


def as_fragments(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` [..., R, K] (R, K multiples of 16) as fragments: [..., R / 16, K / 16, 32, 8], tile by tile."""
    *lead, height, width = rows.shape
    assert height % TILE == 0 and width % TILE == 0, "whole tiles only"
    tiles = rows.reshape(*lead, height // TILE, TILE, width // TILE, TILE).transpose(-3, -2)
    row, column = fragment_index()
    return tiles[..., row.to(rows.device), column.to(rows.device)]


def blocks_of_rows(weights: torch.Tensor, blocks: int) -> torch.Tensor:
    """``weights`` [..., N, K] cut into ``blocks`` blocks of rows (block b: rows b N / blocks ..), each
    padded with zero rows to the largest block's height rounded up to a tile, then as fragments:
    [..., blocks, tiles of rows, K / 16, 32, 8]."""
    *lead, count, width = weights.shape
    largest = max((b + 1) * count // blocks - b * count // blocks for b in range(blocks))
    height = -(-largest // TILE) * TILE
    padded = weights.new_zeros(*lead, blocks, height, width)
    for b in range(blocks):
        first, last = b * count // blocks, (b + 1) * count // blocks
        padded[..., b, : last - first, :] = weights[..., first:last, :]
    return as_fragments(padded)
