"""Fast generation and evaluation on CUDA: GPT-2's own forward, and graphs of any other causal LM's.

``fast_inference_for`` is what the engine calls: it returns an ``Inference``
with the semantics of ``EagerInference`` (DESIGN section 1), or ``None``
(not on CUDA), in which case the engine keeps the eager path. GPT-2 gets
``FastGPT2Inference`` (hand-written kernels, one launch a token); any other
model ``GraphedInference`` (its Hugging Face forward replayed from CUDA
graphs).
"""

from __future__ import annotations

import logging

import torch

from collapse_tui.fast.gpt2 import unsupported_reason
from collapse_tui.fast.graphed import GraphedInference
from collapse_tui.fast.inference import FastGPT2Inference
from collapse_tui.inference import Inference

__all__ = ["FastGPT2Inference", "GraphedInference", "fast_inference_for"]

log = logging.getLogger(__name__)


def fast_inference_for(
    model: torch.nn.Module,
    *,
    block: int,
    temperature: float,
    top_k: int | None,
    autocast_dtype: torch.dtype | None,
) -> Inference | None:
    """A fast ``Inference`` for ``model`` on CUDA, or ``None`` when it has none.

    ``autocast_dtype`` is the engine's precision: bf16 (or fp16) copies of the
    weights are used for generation and evaluation; ``None``
    means fp32 all the way, which the fast paths honour.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("GPT-2 kernels not used (%s): the model's forward replayed from CUDA graphs", reason)
        try:
            return GraphedInference(model, block, temperature, top_k, autocast_dtype)
        except torch.cuda.OutOfMemoryError:
            log.warning("no GPU memory for a %s copy of the weights: generating eagerly", autocast_dtype)
            torch.cuda.empty_cache()
            return None
    if block > model.config.n_positions:
        return None  # the eager path reports this the usual way
    dtype = autocast_dtype or torch.float32
    return FastGPT2Inference(model, block, temperature, top_k, dtype=dtype)
