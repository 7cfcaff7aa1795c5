"""Snapshot tests of the live TUI at 80x24 and 120x40, fed deterministic records.

Records carry fixed times (so it/s and the time left are fixed) and the app
gets a frozen clock (so elapsed is fixed). Update the SVGs after an intended
change of the screen with ``pytest tests/test_tui_snapshots.py --snapshot-update``
and look at them (tests/__snapshots__/) before committing.
"""

from __future__ import annotations

import threading
import time

from fakes import FakeSource, make_record
from textual.pilot import Pilot
from textual.widgets import Input

from collapse_tui.records import Event
from collapse_tui.source import RunInfo
from collapse_tui.tui.app import CollapseApp

EVALS = ("wikitext-2-v1", "ptb")
INFO = RunInfo(
    model="HuggingFaceTB/SmolLM2-135M",
    device="cuda:0",
    max_iters=1000,
    lr=4e-5,
    eval_names=list(EVALS),
)


class FrozenClock:
    """A clock the test sets, so the elapsed time on screen is the same every run."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_app(count: int, total: int, **fake_options) -> tuple[CollapseApp, FrozenClock]:
    clock = FrozenClock()
    records = [make_record(i, total, eval_names=EVALS) for i in range(count)]
    return CollapseApp(FakeSource(records, info=INFO, **fake_options), clock=clock), clock


def settle(app: CollapseApp, clock: FrozenClock, count: int, elapsed: float):
    """A run_before hook: wait for every record, then freeze the status line at ``elapsed``.

    A run that ends by itself stops its elapsed time when it ends: give it a
    ``load_gate``, and it starts only once the clock reads ``elapsed``.
    """

    async def run_before(pilot: Pilot) -> None:
        if app.source.load_gate is not None:
            clock.now = elapsed
            app.source.load_gate.set()
        deadline = time.monotonic() + 10
        while app.records_seen < count or (app.running and app.source.after == "return"):
            assert time.monotonic() < deadline, "the fake run did not deliver its records"
            await pilot.pause(0.01)
        clock.now = elapsed
        app._show_status()
        await pilot.pause()

    return run_before


def test_loading_80x24(snap_compare) -> None:
    """The loading pane at 80 columns: the bar leaves room for its percentage."""
    gate = threading.Event()  # never set: the fake stays loading, half done
    app = CollapseApp(FakeSource([], info=INFO, load_gate=gate), clock=FrozenClock())

    async def run_before(pilot: Pilot) -> None:
        await pilot.pause(0.2)

    try:
        assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
    finally:
        gate.set()


def test_healthy_run_80x24(snap_compare) -> None:
    app, clock = make_app(24, 60)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle(app, clock, 24, 754.0))


def test_browsing_a_past_iteration_80x24(snap_compare) -> None:
    # 40 records of a run sliding into collapse; back to iteration 10, a healthy sample, marked on the charts
    app, clock = make_app(40, 60)
    settled = settle(app, clock, 40, 754.0)

    async def run_before(pilot: Pilot) -> None:
        await settled(pilot)
        await pilot.press("home", "right_curly_bracket")

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_collapsed_run_120x40(snap_compare) -> None:
    script = {59: [Event("collapse", 59, data={"rep4": 0.97})]}
    app, clock = make_app(60, 60, script=script, after="return", load_gate=threading.Event())
    assert snap_compare(app, terminal_size=(120, 40), run_before=settle(app, clock, 60, 3723.0))


def test_lr_dialog_refusing_a_bad_value_80x24(snap_compare) -> None:
    app, clock = make_app(10, 60)
    settled = settle(app, clock, 10, 61.0)

    async def run_before(pilot: Pilot) -> None:
        await settled(pilot)
        await pilot.press("l")
        app.screen.query_one(Input).value = ""
        await pilot.press(*"fast", "enter")

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_help_120x40(snap_compare) -> None:
    app, clock = make_app(10, 60)
    settled = settle(app, clock, 10, 61.0)

    async def run_before(pilot: Pilot) -> None:
        await settled(pilot)
        await pilot.press("question_mark")

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)
