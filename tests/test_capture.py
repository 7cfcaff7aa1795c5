"""``capturing`` collects garbage before a CUDA graph capture and none inside it (without a GPU: a stand-in
for ``torch.cuda.graph``)."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from collapse_tui.capture import capturing


class _HeldByACycle:
    """Stands in for an earlier decoder's graphs: freed only when the cycle collector runs."""

    freed: list[str] = []  # noqa: RUF012 - a record across instances

    def __init__(self, name: str) -> None:
        self.name, self.me = name, self

    def __del__(self) -> None:
        _HeldByACycle.freed.append(self.name)


def test_garbage_goes_before_the_capture_and_none_goes_inside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    @contextlib.contextmanager
    def graph(graph: object, **kwargs: object):
        seen["freed on entry"] = list(_HeldByACycle.freed)
        seen["stream"] = kwargs.get("stream")
        yield
        seen["collector inside"] = gc.isenabled()

    monkeypatch.setattr(torch.cuda, "graph", graph)
    device_stream = object()  # the current device's capture stream (a GPU test makes real ones)
    monkeypatch.setattr("collapse_tui.capture.capture_stream", lambda: device_stream)
    _HeldByACycle.freed.clear()
    _HeldByACycle("before")
    assert gc.isenabled()
    with capturing(object(), capture_error_mode="thread_local"):
        _HeldByACycle("inside")
        _ = [[] for _ in range(20 * gc.get_threshold()[0])]  # enough allocations to start the collector
        assert _HeldByACycle.freed == ["before"]
    # on the current device's own stream: torch's one default stream belongs to the device first captured on
    assert seen == {"freed on entry": ["before"], "stream": device_stream, "collector inside": False}
    assert gc.isenabled()  # back on after the capture
    gc.collect()
    assert _HeldByACycle.freed == ["before", "inside"]
