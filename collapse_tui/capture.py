"""``capturing``: ``torch.cuda.graph`` with Python's cycle collector run before the capture and paused inside it.

Why: CUDA graphs that only a reference cycle keeps alive (an earlier
decoder's, a finished test's) are freed whenever the collector next runs. If
that happens inside another capture, freeing them (``CUDAGraph::reset``) is
an operation a capture does not permit: the capture fails, generation falls
back to eager steps, and torch leaves the default CUDA generator as if still
capturing, so later random draws fail ("Offset increment outside graph
capture"). Seen once in the GPU tests (tenth session): six "operation not
permitted when stream is capturing (function reset)" warnings, one for each
graph of the decoder before. torch no longer collects before a capture by
default (``torch.compiler.config.force_cudagraph_gc``), so this does.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, **kwargs: Any) -> Iterator[None]:
    """``with torch.cuda.graph(graph, **kwargs)``, with no garbage collection inside it.

    For one capture at a time, from one thread, as the engine's worker makes
    them (the collector's switch is the process's; a capture inside another
    would collect inside the outer one).
    """
    enabled = gc.isenabled()
    gc.collect()
    try:
        gc.disable()
        with torch.cuda.graph(graph, **kwargs):
            yield
    finally:
        if enabled:
            gc.enable()
