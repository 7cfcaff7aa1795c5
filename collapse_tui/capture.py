"""``capturing``: ``torch.cuda.graph`` on the device's own capture stream, with Python's cycle collector
run before the capture and paused inside it.

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

#: One capture stream per CUDA device (``capture_stream``).
_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream() -> torch.cuda.Stream:
    """The side stream captures on the current device are made on.

    Why not torch's own: ``torch.cuda.graph`` makes one default capture stream
    a process, on whichever device is current the first time, and entering it
    makes that device current. A capture for cuda:1 after one for cuda:0 (two
    engines, or the GPU tests, in one process) then ran on cuda:0: Triton
    refused cuda:1's tensors, and torch's own operations, guarded to cuda:1, ran
    eagerly outside the capture and left an empty graph (pytorch#87894).
    """
    index = torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(index)
    return _CAPTURE_STREAMS[index]


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, **kwargs: Any) -> Iterator[None]:
    """``with torch.cuda.graph(graph, **kwargs)``, on the current device's ``capture_stream`` unless given
    another, with no garbage collection inside it.

    For one capture at a time, from one thread, as the engine's worker makes
    them (the collector's switch is the process's; a capture inside another
    would collect inside the outer one).
    """
    if kwargs.get("stream") is None:
        kwargs["stream"] = capture_stream()
    enabled = gc.isenabled()
    gc.collect()
    try:
        gc.disable()
        with torch.cuda.graph(graph, **kwargs):
            yield
    finally:
        if enabled:
            gc.enable()
