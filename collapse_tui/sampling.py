"""Sampling the next token: temperature, top-k, and a draw with no host sync.

The draw uses the exponential-race form of categorical sampling: with
E_j ~ Exp(1) independent, argmax_j p_j / E_j is distributed as Categorical(p).
It is a fixed-shape device computation (no ``torch.multinomial`` and no
``.item()``), so the same function serves the eager CPU path and a captured
CUDA graph.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Scale by temperature and keep the ``top_k`` largest logits (the rest -inf), as nanoGPT does."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token id per row of ``logits`` ([..., vocab] → [...])."""
    probs = torch.softmax(filter_logits(logits, temperature, top_k), dim=-1)
    # clamp: a zero draw over a zero probability would give NaN, which argmax would pick.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-30)
    return torch.argmax(probs / race, dim=-1)
