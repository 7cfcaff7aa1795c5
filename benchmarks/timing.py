"""Timing GPU work by CUDA graph replay, shared by the benchmark scripts.

Capturing the calls in a graph takes host launch overhead out of the
measurement, so what is timed is the kernels themselves, back to back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def graph_time(fns: list[Callable[[], object]], repeats: int = 20) -> float:
    """Microseconds per call, each of ``fns`` once per graph replay, median of ``repeats`` replays.

    Warm-up runs on a side stream, as capture requires for compiled or
    cuBLAS-workspace-allocating calls.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return sorted(times)[len(times) // 2]


def kernels_of(fn: Callable[[], object], rows: int = 0) -> tuple[float, int, str]:
    """One call of ``fn`` under the profiler: seconds of CUDA kernel time, the kernels' count, and
    a table of the ``rows`` kernels that took the most time (empty for 0)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows) if rows else ""
    return sum(e.device_time for e in events) / 1e6, len(events), table


def step_replay_seconds(loop: Any, position: int, replays: int = 200) -> float:
    """Seconds per replay of a ``StepLoop``'s one-step graph, its counter held at ``position`` (inside its buffers)."""
    graph = loop.graph
    assert graph is not None, "the step was not captured"
    for _ in range(10):
        loop.counter.fill_(position)
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        loop.counter.fill_(position)
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays
