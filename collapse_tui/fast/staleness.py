"""Copies of the master weights learn that an optimizer stepped: any step marks every watched copy dirty.

Why: the fast paths compute from copies of the weights (bf16, transposed,
stacked) that CUDA graphs read in place; a copy that missed an update would
make the next sample come from the old model. The engine calls
``Inference.weights_changed`` after each step, and this is the safety net
behind it: the fused AdamW kernel updates parameters without bumping their
version counters, so the counters alone cannot tell that a step happened.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class Watched(Protocol):
    #: set by any optimizer step; the copy clears it when it refreshes
    dirty: bool


#: Every live watched copy, held weakly: a dropped inference is not kept alive by the hook.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_HOOK: list[Any] = []


def _after_any_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for copy in list(_LIVE):
        copy.dirty = True


def watch_optimizer_steps(copy: Watched) -> None:
    """Register the global optimizer hook once, and ``copy`` with it."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_after_any_optimizer_step))
    _LIVE.add(copy)
