"""Helpers of the GPU tests (tests/test_fast_gpu.py, tests/test_graphed_gpu.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def teach_to_say(model: torch.nn.Module, token: int, vocab: int, after_step: Callable[[], None]) -> None:
    """Five drastic AdamW steps that teach ``model`` to say ``token`` after anything, as the engine trains.

    bf16 autocast over fp32 weights and the fused AdamW kernel, which does not
    bump the weights' version counters; ``after_step`` runs after each step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), fused=True)
    target = torch.full((1, 32), token, device="cuda")
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(torch.randint(0, vocab, (1, 32), device="cuda")).logits
        F.cross_entropy(logits.float().flatten(0, 1), target.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_step()
