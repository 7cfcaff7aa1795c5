"""Functional tests of the live TUI: press keys, check what the run received and what the screen shows.

The run is a ``FakeSource`` (tests/fakes.py) that honours the controls the
way the engine does, so these tests need no model and run in about a second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from fakes import FakeSource, make_record, user_error_source
from rich.console import Console
from runfolders import make_run
from runfolders import record as folder_record
from textual.app import App, ComposeResult
from textual.pilot import Pilot
from textual.renderables.sparkline import Sparkline as SparklineRenderable
from textual.widgets import Input, Label, Sparkline, Static

import collapse_tui.tui.app as app_module
from collapse_tui.errors import UserError
from collapse_tui.follow import FolderSource
from collapse_tui.records import Event, IterationRecord
from collapse_tui.runfolder import RunWriter
from collapse_tui.source import RunInfo
from collapse_tui.tui.app import (
    BRIEF_CHARS,
    TOAST_RACK_ID,
    WAITING_MESSAGE,
    CollapseApp,
    EventReport,
    RecordReport,
    StatusReport,
    brief,
    run_app,
)
from collapse_tui.tui.history import SampleHistory
from collapse_tui.tui.screens import HelpScreen, LrScreen, lr_text, parse_lr
from collapse_tui.tui.widgets import (
    ChartMarker,
    Downsampled,
    LossCharts,
    MarkedSparkline,
    RepetitionMeter,
    SampleView,
    SeriesChart,
    StatusLine,
    highlight_repeats,
    series_caption,
    sparkline_columns,
    visible_controls,
)

#: A generous bound for things that take milliseconds; it only matters when something hangs.
DEADLINE_S = 10.0


async def wait_until(pilot: Pilot, predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.01)


def drive(
    source: FakeSource,
    scenario: Callable[[CollapseApp, Pilot], Awaitable[None]],
    clock: Callable[[], float] = lambda: 0.0,
    notifications: bool = False,
    size: tuple[int, int] = (80, 24),
) -> CollapseApp:
    """Run the app on ``source`` at ``size`` (80x24) through ``scenario``; return the app once it has closed.

    ``notifications`` draws the notices on the screen, as a terminal shows them (Textual's tests
    keep them out of the screen unless asked).
    """
    app = CollapseApp(source, clock=clock)

    async def main() -> None:
        async with app.run_test(size=size, notifications=notifications) as pilot:
            await scenario(app, pilot)

    asyncio.run(main())
    return app


def log_text(app: CollapseApp) -> str:
    """The event pane's text, its wrapped lines joined again."""
    return " ".join(strip.text.strip() for strip in app.query_one("#events").lines)


async def started(app: CollapseApp, pilot: Pilot) -> None:
    await wait_until(pilot, lambda: not app.loading, "the run to start")


async def open_lr_dialog(app: CollapseApp, pilot: Pilot) -> None:
    """Press l and wait for the learning-rate dialog."""
    await pilot.press("l")
    await wait_until(pilot, lambda: isinstance(app.screen, LrScreen), "the lr dialog")


# -- the panes -----------------------------------------------------------------


def test_records_fill_every_pane() -> None:
    info = RunInfo(model="org/tiny", device="cpu", max_iters=100, lr=4e-5, eval_names=["wikitext-2", "ptb"])
    records = [make_record(i, 10, eval_names=("wikitext-2", "ptb")) for i in range(10)]

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 10, "ten records")
        charts = app.query_one(LossCharts)
        assert charts.names == ["gen_loss", "wikitext-2", "ptb"]
        sparklines = list(app.query(Sparkline))
        assert [len(s.data or []) for s in sparklines] == [10, 10, 10]
        titles = [str(title.render()) for title in app.query(".series-title")]
        assert titles[0].startswith("gen_loss 0.05") and "max 3.05" in titles[0]
        meter = app.query_one(RepetitionMeter)
        assert meter.rep4 == pytest.approx(records[-1].rep4)
        assert meter.state == "running"
        assert app.query_one("#sample").border_title == "sample · iteration 9"
        status = str(app.query_one("#status").render())
        assert "tiny" in status and "it 10/100" in status and "2.00 it/s" in status  # ten done
        assert not app.query_one("#loading").display

    drive(FakeSource(records, info=info), scenario)


def test_loading_shows_progress_and_greys_out_the_keys_it_cannot_take_yet() -> None:
    gate = threading.Event()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        label = app.query_one("#loading-label", Label)
        await wait_until(pilot, lambda: "fake model" in str(label.render()), "the loading message")
        assert app.state == "loading"
        assert app.check_action("snapshot", ()) is None  # shown, greyed
        assert app.check_action("lr_up", ()) is None
        await pilot.press("plus", "s")
        assert app.source.controls.pending_lr is None and not app.snapshot_pending
        gate.set()
        await started(app, pilot)
        assert app.state == "running" and app.check_action("pause", ()) is True

    drive(FakeSource(load_gate=gate), scenario)


def test_a_pause_pressed_while_the_run_loads_holds_it_before_its_first_iteration() -> None:
    # A large model can take minutes to load and compile: a researcher may want it to wait at the start.
    gate = threading.Event()
    source = FakeSource([make_record(0, 5)], load_gate=gate)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.state == "loading", "loading")
        assert app.check_action("pause", ()) is True
        await pilot.press("space")
        assert source.controls.paused
        gate.set()
        await wait_until(pilot, lambda: app.state == "paused", "the pause at the first boundary")
        assert app.records_seen == 0 and [e.event for e in source.events] == ["start", "pause"]
        await pilot.press("space")
        await wait_until(pilot, lambda: app.records_seen == 1, "the first iteration")

    drive(source, scenario)


# -- the keys ------------------------------------------------------------------


def test_space_pauses_and_p_resumes(tmp_path: Path) -> None:
    source = FakeSource(snapshot_root=tmp_path)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await pilot.press("space")
        assert source.controls.paused
        await wait_until(pilot, lambda: app.run_paused, "the pause event")
        assert app.state == "paused"
        # the footer now offers resume instead of pause
        assert app.check_action("pause", ()) is False and app.check_action("resume", ()) is True
        await pilot.press("s")  # a paused run saves it at once: no iteration is in flight to wait for
        assert any(n.message == "saved now (the run is paused)" for n in app._notifications)
        await pilot.press("p")
        await wait_until(pilot, lambda: "resume" in [e.event for e in source.events], "the resume event")
        assert not source.controls.paused and app.state == "running"

    drive(source, scenario)


def test_plus_doubles_and_minus_halves_the_lr() -> None:
    source = FakeSource()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await pilot.press("plus")
        await wait_until(pilot, lambda: source.lr_changes == [8e-5], "lr 8e-5 applied")
        await wait_until(pilot, lambda: app.requested_lr is None, "the lr event")
        assert app.current_lr == 8e-5
        await pilot.press("minus", "minus")
        await wait_until(pilot, lambda: source.lr == 2e-5, "lr 2e-5 applied")
        assert app.current_lr == 2e-5 and source.lr_changes[0] == 8e-5

    drive(source, scenario)


def source_at_lr(lr: float) -> FakeSource:
    return FakeSource(
        info=RunInfo(model="fake", device="cpu", max_iters=100, lr=lr, eval_names=["wikitext-2"])
    )


def test_plus_stops_at_the_same_ceiling_as_the_typed_lr() -> None:
    source = source_at_lr(0.75)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await pilot.press("plus")  # 1.5 would be above the ceiling: it stops at 1
        await wait_until(pilot, lambda: source.lr_changes == [1.0], "lr 1 applied")
        assert any("lr stops at 1" in n.message for n in app._notifications)
        await pilot.press("plus")  # at the ceiling: no further
        await pilot.pause(0.05)
        assert source.controls.pending_lr is None and app.current_lr == 1.0
        assert any("above 1 the update only wrecks the model" in n.message for n in app._notifications)

    drive(source, scenario)


def test_the_lr_dialog_takes_back_a_run_lr_above_the_ceiling_but_nothing_higher() -> None:
    source = source_at_lr(1.23456789)  # --lr 1.23456789 on the command line

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await open_lr_dialog(app, pilot)
        assert app.screen.query_one(Input).value == "1.23456789"  # not rounded up to 1.23457
        await pilot.press("enter")  # its own value, as shown: taken, no change
        assert not isinstance(app.screen, LrScreen)
        await open_lr_dialog(app, pilot)
        app.screen.query_one(Input).value = "1.3"
        await pilot.press("enter")
        assert "type at most 1.23457" in str(app.screen.query_one("#lr-error", Label).render())
        await pilot.pause()
        assert "at&#160;most&#160;1.23457" in app.export_screenshot()  # on the screen, not cut at its edge
        app.screen.query_one(Input).value = "1.1"
        await pilot.press("enter")  # lower, though still above 1: taken
        await wait_until(pilot, lambda: source.lr_changes[-1:] == [1.1], "lr 1.1 applied")

    drive(source, scenario)


def test_minus_still_lowers_an_lr_above_the_ceiling() -> None:
    source = source_at_lr(8.0)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await pilot.press("minus")
        await wait_until(pilot, lambda: source.lr_changes == [4.0], "lr 4 applied")

    drive(source, scenario)


def test_typed_lr_is_applied() -> None:
    source = FakeSource()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await open_lr_dialog(app, pilot)
        app.screen.query_one(Input).value = ""
        await pilot.press(*"1e-3", "enter")
        await wait_until(pilot, lambda: source.lr_changes == [1e-3], "the typed lr applied")
        assert not isinstance(app.screen, LrScreen)

    drive(source, scenario)


def test_in_the_lr_dialog_q_is_typed_and_the_footer_does_not_offer_it_as_quit() -> None:
    source = FakeSource()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await open_lr_dialog(app, pilot)
        assert app.check_action("quit", ()) is False and app.check_action("interrupt", ()) is True
        app.screen.query_one(Input).value = ""
        await pilot.press("q")
        assert app.screen.query_one(Input).value == "q" and not source.controls.stop_requested

    drive(source, scenario)


def test_help_scrolls_where_the_terminal_is_too_short_for_it() -> None:
    async def main() -> None:
        app = CollapseApp(FakeSource())
        async with app.run_test(size=(80, 18)) as pilot:
            await started(app, pilot)
            await pilot.press("question_mark")
            box = app.screen.query_one("#help-box")
            await wait_until(pilot, lambda: box.max_scroll_y > 0, "the help laid out, taller than the screen")
            await pilot.press("end")
            await wait_until(pilot, lambda: box.scroll_y == box.max_scroll_y, "the help's end in view")
            await pilot.press("escape")  # its last line says so, now in view
            assert not isinstance(app.screen, HelpScreen)

    asyncio.run(main())


def test_bad_typed_lr_is_refused_with_the_error_shown() -> None:
    source = FakeSource()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await open_lr_dialog(app, pilot)
        app.screen.query_one(Input).value = ""
        await pilot.press(*"fast", "enter")
        assert isinstance(app.screen, LrScreen)  # still open
        assert "not a number" in str(app.screen.query_one("#lr-error", Label).render())
        app.screen.query_one(Input).value = ""
        await pilot.press(*"-1", "enter")
        assert "positive" in str(app.screen.query_one("#lr-error", Label).render())
        app.screen.query_one(Input).value = "[/]"  # quoted back as typed: not markup, which would raise
        await pilot.press("enter")
        assert "not a number: '[/]'" in str(app.screen.query_one("#lr-error", Label).render())
        await pilot.press("escape")
        assert not isinstance(app.screen, LrScreen)
        await pilot.pause(0.05)
        assert source.lr_changes == [] and source.controls.pending_lr is None

    drive(source, scenario)


@pytest.mark.parametrize(
    ("text", "ok"),
    [("4e-5", True), ("0.001", True), ("0", False), ("nan", False), ("inf", False), ("2", False)],
)
def test_parse_lr(text: str, ok: bool) -> None:
    if ok:
        assert parse_lr(text) == float(text)
    else:
        with pytest.raises(ValueError):
            parse_lr(text)
    assert parse_lr("2", current=2.0) == 2.0  # a run's own lr above the ceiling
    assert parse_lr("1.5", current=2.0) == 1.5
    assert lr_text(4e-5) == "4e-05" and lr_text(1.23456789) == "1.23456789"


def test_snapshot_saves_a_screenshot_in_the_snapshot_folder(tmp_path: Path) -> None:
    info = RunInfo(model="m", device="cpu", max_iters=9, lr=1e-3, eval_names=["ptb"], run_dir=str(tmp_path))
    # the snapshot is taken after the iteration in flight, as the engine takes it
    source = FakeSource(
        [make_record(i, 5) for i in range(3)],
        info=info,
        snapshot_root=tmp_path,
        after="live",
        iteration_s=0.5,
    )

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen >= 3, "three records")
        await pilot.press("s")
        await wait_until(pilot, lambda: bool(source.snapshots), "the snapshot")
        svg = source.snapshots[0] / "screen.svg"
        await wait_until(pilot, svg.exists, "screen.svg")
        drawn = svg.read_text(encoding="utf-8")
        assert drawn.lstrip().startswith("<svg")
        assert "snapshot → snapshots/iter-" in log_text(app)  # shown inside the run folder
        # the moment as it was, without the notice that asked for it over the charts
        assert "iteration&#160;in&#160;flight" not in drawn and "snapshot&#160;requested" not in drawn
        assert "rep4" in drawn
        # and the notices are back on the screen once it is saved
        rack = app.screen.query_one(f"#{TOAST_RACK_ID}")
        await wait_until(pilot, lambda: rack.display, "the notices shown again")

    drive(source, scenario, notifications=True)


def test_a_snapshot_this_screen_did_not_ask_for_gets_no_screenshot(tmp_path: Path) -> None:
    # e.g. a watcher replaying a finished run's events
    old = tmp_path / "snapshots" / "iter-1"
    old.mkdir(parents=True)
    script = {1: [Event("snapshot", 1, time=0.0, data={"path": str(old)})]}
    source = FakeSource([make_record(i, 5) for i in range(3)], script=script)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 3, "three records")
        assert "snapshot" in log_text(app)

    drive(source, scenario)
    assert not (old / "screen.svg").exists()


def test_quit_returns_while_the_run_is_mid_iteration() -> None:
    # An iteration that would take a minute: quitting must not wait for it.
    source = FakeSource(after="live", iteration_s=60.0)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: source.in_iteration, "an iteration in flight")
        await pilot.press("q")
        assert source.controls.stop_requested
        await wait_until(pilot, lambda: source.finished, "the run to stop")
        await wait_until(pilot, lambda: not app.is_running, "the app to exit by itself")

    app = drive(source, scenario)
    assert source.stopped_mid_iteration  # it gave up the iteration: quit did not wait for it
    assert app.return_value == {"status": "stopped", "iterations": 0}
    assert source.events[-1].event == "stop"


def test_a_pause_shows_pausing_until_the_iteration_in_flight_ends() -> None:
    source = FakeSource(after="live", iteration_s=60.0)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: source.in_iteration, "an iteration in flight")
        await pilot.press("space")
        assert source.controls.paused and not app.run_paused
        assert app.state == "pausing" and app.query_one(RepetitionMeter).state == "pausing"
        await pilot.press("q")

    drive(source, scenario)


def test_a_run_going_on_after_its_collapse_shows_its_pause() -> None:
    info = RunInfo(
        model="fake", device="cpu", max_iters=100, lr=4e-5, eval_names=["wikitext-2"], keep_going=True
    )
    records = [make_record(i, 6) for i in range(6)]
    script = {2: [Event("collapse", 2, time=0.0, data={"rep4": 0.95})]}
    source = FakeSource(records, info=info, script=script, after="wait")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 6, "every record")
        assert app.state == "collapsed"
        await pilot.press("space")
        await wait_until(pilot, lambda: app.run_paused, "the pause event")
        assert app.state == "paused"
        await pilot.press("p")
        await wait_until(pilot, lambda: not app.run_paused, "the resume event")
        assert app.state == "collapsed"

    drive(source, scenario)


def test_elapsed_time_stops_when_the_run_ends() -> None:
    now = [0.0]
    gate = threading.Event()
    source = FakeSource([make_record(i, 3) for i in range(3)], after="return", load_gate=gate)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        now[0] = 5.0  # the run takes five seconds
        gate.set()
        await wait_until(pilot, lambda: not app.running, "the run to end")
        now[0] = 7200.0  # the researcher comes back two hours later
        app._show_status()
        await pilot.pause(0.05)
        status = str(app.query_one("#status").render())
        assert "0:00:05" in status and "2:00:00" not in status

    drive(source, scenario, clock=lambda: now[0])


def test_a_resume_restarts_the_rate_from_the_records_after_it() -> None:
    source = FakeSource([make_record(i, 10) for i in range(4)], after="wait")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 4, "four records")
        assert app._rate() == pytest.approx(2.0)
        await pilot.press("space")
        await wait_until(pilot, lambda: app.run_paused, "the pause event")
        await pilot.press("p")
        await wait_until(pilot, lambda: not app.run_paused, "the resume event")
        assert app._rate() is None  # the pause is not counted as iterations' time

    drive(source, scenario)


def test_a_resume_clears_what_the_abandoned_iterations_showed() -> None:
    records = [make_record(i, 6) for i in (0, 1, 2, 1, 2)]  # a watcher replaying: 0-2, then resumed at 1
    script = {
        2: [Event("error", 2, time=0.0, data={"message": "non-finite loss"})],
        3: [Event("resumed_from", 1, time=0.0, data={"path": "snapshots/iter-1", "collapsed_at": None})],
    }
    source = FakeSource(records, script=script, after="wait")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(
            pilot, lambda: app.history.get(1) and app.history[1].record is records[3], "the resume"
        )
        await wait_until(pilot, lambda: app.records_seen == 3, "every record")
        assert app.state == "running" and not app.failed

    drive(source, scenario)


def test_a_watcher_following_a_run_across_its_resume_takes_the_resumes_max_iters_and_lr() -> None:
    """Opened on a run of 4 iterations at lr 1e-3 that a resume takes on to 9, from a snapshot saved
    at lr 2e-3: the run goes on (not FINISHING, its keys live) and + doubles 2e-3, before any
    resumed iteration has said its lr."""
    info = RunInfo(model="fake-model", device="cpu", max_iters=4, lr=1e-3, eval_names=["wikitext-2"])
    source = FakeSource([make_record(i, 9, lr=1e-3) for i in range(4)], info=info, after="wait")
    resumed = Event(
        "resumed_from", 4, time=0.0, data={"path": "snapshots/iter-4", "lr": 2e-3, "max_iters": 9}
    )

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 4 and app.ending, "the run before, at its end")
        app.post_message(EventReport(resumed))
        await wait_until(pilot, lambda: app.info.max_iters == 9, "the resume")
        assert (app.state, app.ending, app.applied_lr) == ("running", False, 2e-3)
        assert app.check_action("lr_up", ()) is True
        await pilot.press("+")
        await wait_until(pilot, lambda: source.lr_changes, "the lr change")
        assert source.lr_changes == [4e-3]

    drive(source, scenario)


def test_an_lr_another_watcher_superseded_stops_showing_as_pending_after_two_iterations() -> None:
    source = FakeSource([make_record(i, 9, lr=1e-3) for i in range(3)], after="wait")
    source.info.lr = 1e-3

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 3, "three records")
        source.controls.set_lr = lambda lr: None  # the run took another watcher's lr at that boundary
        await pilot.press("+")
        assert app.requested_lr == 2e-3
        now = app.requested_since  # make_record's iterations take 0.45 s
        app.post_message(RecordReport(replace(make_record(3, 9, lr=1e-3), time=now + 0.5)))  # in flight
        await wait_until(pilot, lambda: app.records_seen == 4, "the iteration in flight")
        assert app.requested_lr == 2e-3
        app.post_message(RecordReport(replace(make_record(4, 9, lr=1e-3), time=now + 2.0)))
        await wait_until(pilot, lambda: app.records_seen == 5, "an iteration begun after the run read it")
        assert app.requested_lr is None and app.current_lr == 1e-3  # + works from the run's lr again

    drive(source, scenario)


def test_a_run_stopped_while_paused_is_not_shown_paused_once_it_goes_on() -> None:
    source = FakeSource([make_record(i, 9) for i in range(2)], after="wait")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 2, "two records")
        for kind in ("pause", "stop", "resumed_from"):
            app.post_message(EventReport(Event(kind, 2, time=0.0, data={"path": "snapshots/iter-2"})))
            await pilot.pause()
            assert app.run_paused == (kind == "pause")

    drive(source, scenario)


def test_a_watcher_draws_a_resumed_run_from_its_resume_point() -> None:
    """Records 0-3, then a resume from the snapshot before 2: the charts hold 0, 1 and the new 2, 3,
    and the streak above the collapse threshold counts 0, 1, 2, 3 of the new branch (all above)."""
    high = [replace(make_record(i, 6), rep4=0.95) for i in range(4)]
    first, second = (
        [*high[:2], make_record(2, 6), make_record(3, 6)],
        [replace(make_record(i, 12), rep4=0.95) for i in (2, 3)],
    )
    script = {
        4: [Event("resumed_from", 2, time=0.0, data={"path": "snapshots/iter-2", "collapsed_at": None})]
    }
    source = FakeSource([*first, *second], script=script, after="wait")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(
            pilot, lambda: app.history.get(3) and app.history[3].record is second[1], "the new 3"
        )
        shown = [first[0], first[1], *second]
        series = app.query_one("#series-0", SeriesChart).series
        assert series.data() == pytest.approx([r.gen_loss for r in shown])
        valid = app.query_one("#series-1", SeriesChart).series
        assert valid.data() == pytest.approx([r.valid["wikitext-2"] for r in shown])
        assert app.records_seen == 4 and app.history.iterations == [0, 1, 2, 3]
        assert app.query_one(RepetitionMeter).detector.streak == 4

    drive(source, scenario)


def test_a_watcher_forgets_the_iterations_a_resume_abandons_as_soon_as_it_resumes() -> None:
    """Records 0-3 drawn, then a resume from the snapshot before 2 that has not written an iteration yet
    (a large model takes minutes): the charts hold 0 and 1 at once, not the old 2 and 3 until then."""
    source = FakeSource([make_record(i, 6) for i in range(4)], after="wait")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 4, "four records")
        resumed = Event(
            "resumed_from", 2, time=2_000.0, data={"path": "snapshots/iter-2", "collapsed_at": None}
        )
        app.post_message(EventReport(resumed))
        await wait_until(pilot, lambda: any(e.event == "resumed_from" for e in app.events), "the resume")
        assert app.history.iterations == [0, 1] and app.records_seen == 2
        series = app.query_one("#series-0", SeriesChart).series
        assert series.data() == pytest.approx([make_record(i, 6).gen_loss for i in (0, 1)])

    drive(source, scenario)


def test_browsing_an_abandoned_iteration_follows_again_when_the_resumed_branch_arrives() -> None:
    source = FakeSource([make_record(i, 6) for i in range(4)], after="wait")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 4, "four records")
        await pilot.press("left_square_bracket")  # back to iteration 2, which the resume abandons
        await wait_until(pilot, lambda: app.browsing is not None, "browsing")
        assert app.browsing.record.iteration == 2
        app.post_message(RecordReport(make_record(2, 12)))  # the first record of a resume from iter-2
        await wait_until(pilot, lambda: app.browsing is None, "following again")
        assert app.query_one("#series-0", SeriesChart).query_one(ChartMarker).ordinal is None
        assert app.history.iterations == [0, 1, 2] and app.records_seen == 3

    drive(source, scenario)


def test_collapse_keeps_the_screen_until_q() -> None:
    records = [make_record(i, 6) for i in range(6)]
    script = {5: [Event("collapse", 5, data={"rep4": 0.95})]}  # happening now: a notice
    source = FakeSource(records, script=script, after="return")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to end by itself")
        await pilot.pause(0.05)
        assert app.state == "collapsed" and app.is_running
        assert any("collapsed" in n.title for n in app._notifications)
        assert app.check_action("pause", ()) is None and app.check_action("lr_up", ()) is None
        await pilot.press("q")

    app = drive(source, scenario)
    assert app.return_value == {"status": "finished", "iterations": 6}


def test_a_collapse_event_with_a_hand_edited_rep4_still_gives_its_notice() -> None:
    records = [make_record(i, 6) for i in range(3)]
    source = FakeSource(records, script={2: [Event("collapse", 2, data={"rep4": "high"})]}, after="return")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to end by itself")
        await pilot.pause(0.05)
        assert app.state == "collapsed"
        assert [n.message for n in app._notifications if n.title == "collapsed"] == ["the run stops; q quits"]
        await pilot.press("q")

    drive(source, scenario)


def test_paths_and_messages_with_brackets_are_shown_as_they_are() -> None:
    failed = "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0 in /r/[/]x"
    source = FakeSource(
        [make_record(i, 5) for i in range(3)],
        script={1: [Event("error", 1, time=0.0, data={"message": failed})]},
    )
    source.status_text = "loading model /models/[b]tiny"

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        label = app.query_one("#loading-label", Label)
        await wait_until(pilot, lambda: "[b]tiny" in str(label.render()), "the loading message")
        await wait_until(pilot, lambda: app.records_seen == 3, "three records")
        notices = [n for n in app._notifications if n.title == "run error"]
        assert [n.message for n in notices] == [failed] and not notices[0].markup
        await pilot.pause(0.1)  # drawn without raising on its "[/]"
        assert app.is_running and app.state == "error"

    drive(source, scenario, notifications=True)


def test_a_watcher_is_told_when_the_end_it_shows_has_no_final_snapshot() -> None:
    """FolderSource's word for a process that ended while it saved its final snapshot: a notice, not
    only a log line (other snapshot failures are notices only for a snapshot this screen asked for)."""
    lost = "the run's process ended while saving its final snapshot iter-3, which was not saved"
    source = FakeSource(
        [make_record(i, 5) for i in range(3)],
        script={2: [Event("snapshot_failed", 2, data={"message": "disk full"})]},
        after="return",
    )
    run = source.run

    def run_then_lose_the_end(listener):
        summary = run(listener)
        listener.on_event(Event("snapshot_failed", 3, data={"message": lost, "final": True}))
        return summary

    source.run = run_then_lose_the_end

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: lost in log_text(app), "the lost end in the log")
        assert [n.message for n in app._notifications if n.title == "snapshot failed"] == [lost]

    drive(source, scenario)


def test_a_crashed_run_shows_error_and_stays() -> None:
    source = FakeSource(fail_with=RuntimeError("CUDA exploded"))

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to fail")
        await pilot.pause(0.05)
        assert app.state == "error" and app.is_running
        assert "run failed: RuntimeError: CUDA exploded" in log_text(app)

    drive(source, scenario)


class ErrorThenCrash(FakeSource):
    """A run that logs its error event, then raises, as the engine does on a crash."""

    def run(self, listener):
        listener.on_event(Event("error", 0, time=0.0, data={"message": "RuntimeError: CUDA exploded"}))
        raise RuntimeError("CUDA exploded")


def test_a_crash_the_run_has_logged_is_not_logged_twice() -> None:
    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to fail")
        await pilot.pause(0.05)
        assert app.state == "error"
        assert log_text(app).count("CUDA exploded") == 1

    drive(ErrorThenCrash(), scenario)


def test_once_the_last_iteration_is_in_the_steering_keys_go_grey_and_a_late_lr_is_refused() -> None:
    info = RunInfo(model="fake", device="cpu", max_iters=3, lr=4e-5, eval_names=["wikitext-2"])
    source = FakeSource([make_record(i, 3) for i in range(3)], info=info)  # then it "saves" until stopped

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await pilot.press("l")  # the dialog is open when the run's last record comes
        await wait_until(pilot, lambda: app.records_seen == 3, "the last record")
        await pilot.press("5", "e", "-", "4", "enter")
        await pilot.pause(0.1)
        assert source.lr_changes == [] and app.requested_lr is None
        assert app.state == "finishing"
        for action in ("pause", "lr_up", "lr_down", "type_lr", "snapshot"):
            assert app.check_action(action, ()) is None, action
        status = str(app.query_one("#status").render())
        assert "lr 4e-05" in status and "→" not in status

    drive(source, scenario)


def test_while_paused_the_status_line_shows_no_rate_from_before() -> None:
    source = FakeSource([make_record(i, 10) for i in range(4)])

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 4, "the records")
        assert "2.00 it/s" in str(app.query_one("#status").render())
        await pilot.press("space")
        await wait_until(pilot, lambda: app.state == "paused", "the pause")
        status = str(app.query_one("#status").render())
        assert "– it/s" in status and "– left" in status

    drive(source, scenario)


def test_the_event_log_wraps_its_lines_again_when_the_terminal_is_resized() -> None:
    source = FakeSource()
    message = "out of GPU memory loading gpt2-xl: it needs about 20 GiB and 12 are free; try --model gpt2"

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await pilot.resize_terminal(200, 50)
        await pilot.pause(0.1)
        app._log(message)
        await pilot.pause(0.1)
        wide = len(app.query_one("#events").lines)
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        assert message in log_text(app)
        assert len(app.query_one("#events").lines) > wide  # wrapped again, into more lines

    drive(source, scenario)


def test_ctrl_c_quits_as_q_does() -> None:
    """Over SSH, Ctrl-C is how people leave a terminal program (Textual would only show a hint)."""
    source = FakeSource([make_record(0, 5)])

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 1, "a record")
        await pilot.press("ctrl+c")
        await wait_until(pilot, lambda: source.controls.stop_requested, "the stop Ctrl-C asks for")

    drive(source, scenario)


@pytest.mark.parametrize("run_ended_first", [False, True])
def test_ctrl_c_that_stops_a_run_early_reads_as_an_interrupt(monkeypatch, run_ended_first: bool) -> None:
    """Ctrl-C gives exit code 130 as kill -INT does, if it cut the run short; q does not."""
    records = [make_record(i, 5) for i in range(2)]
    source = FakeSource(records, after="return" if run_ended_first else "wait")

    class PressesCtrlC(CollapseApp):
        """Presses ctrl+c once both records are in (and, for a run that ends first, once it has)."""

        CSS_PATH = str(Path(app_module.__file__).with_name("app.tcss"))
        pressed = False

        def on_mount(self) -> None:
            super().on_mount()
            self.set_interval(0.02, self._press_when_ready)

        async def _press_when_ready(self) -> None:
            ready = self.records_seen == 2 and (self.run_done.is_set() or not run_ended_first)
            if ready and not self.pressed:
                self.pressed = True
                await self.run_action("interrupt")

    monkeypatch.setattr("collapse_tui.tui.app.CollapseApp", PressesCtrlC)
    monkeypatch.setattr("collapse_tui.tui.app.terminal_gone", lambda: False)
    done = threading.Event()

    def kill_if_still_there() -> None:  # a Ctrl-C that did nothing must fail the test, not hang it
        if not done.wait(DEADLINE_S):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_if_still_there, daemon=True).start()
    summary = run_app(source, headless=True)
    done.set()
    assert ("signal" in summary) is not run_ended_first
    if not run_ended_first:
        assert summary["signal"] == "SIGINT"


class SlowToStop(FakeSource):
    """A run that, once asked to stop, takes until ``release`` to end (a large model's final snapshot)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def run(self, listener):
        listener.on_event(Event("start", 0, time=0.0))
        listener.on_record(make_record(0, 5))
        while not self.controls.stop_requested:
            self.controls.wait(0.01)
        self.release.wait(30)
        return {"status": "stopped", "iterations": 1}


def test_a_quit_that_outlasts_the_grace_says_below_the_screen_that_the_run_is_stopping() -> None:
    source = SlowToStop()
    app = CollapseApp(source)
    app.QUIT_GRACE_S = 0.1
    messages: list[object] = []
    leave = app.exit

    def exit_recording(*args, **kwargs) -> None:
        messages.append(kwargs.get("message"))
        leave(*args, **kwargs)

    app.exit = exit_recording  # type: ignore[method-assign]

    async def main() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.records_seen == 1, "a record")
            await pilot.press("q")
            await wait_until(pilot, lambda: bool(messages), "the app to leave")
            source.release.set()

    asyncio.run(main())
    assert [str(m) for m in messages] == [WAITING_MESSAGE]


def test_a_read_only_source_hides_the_steering_keys() -> None:
    source = FakeSource([make_record(0, 5)])
    source.controls.read_only = True  # what a read-only watcher's controls say

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 1, "a record")
        for action in ("pause", "resume", "lr_up", "lr_down", "type_lr", "snapshot"):
            assert app.check_action(action, ()) is False, action
        await pilot.press("space", "plus", "s")
        assert not source.controls.paused and source.controls.pending_lr is None
        assert app.check_action("quit", ()) and app.check_action("help", ())

    drive(source, scenario)


def test_a_steering_command_that_cannot_be_written_is_a_notice_not_a_crash() -> None:
    # A watcher's commands go to commands.jsonl; on a full disk the write fails.
    source = FakeSource([make_record(0, 5)])

    def full_disk(*args: object, **kwargs: object) -> None:
        raise UserError("cannot send 'pause' to run: No space left on device")

    source.controls.pause = full_disk  # type: ignore[method-assign]
    source.controls.set_lr = full_disk  # type: ignore[method-assign]
    source.controls.request_snapshot = full_disk  # type: ignore[method-assign]
    notices: list[str] = []

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        app.notify = lambda message, **kw: notices.append(str(message))  # type: ignore[method-assign]
        await wait_until(pilot, lambda: app.records_seen == 1, "a record")
        await pilot.press("space", "plus", "s")
        await pilot.pause()
        assert len(notices) == 3 and all("No space left" in n for n in notices), notices
        assert not app.snapshot_pending and app.requested_lr is None
        assert app.is_running

    drive(source, scenario)


# -- short and narrow terminals (tmux panes) ---------------------------------------

EVAL_SETS = ("wikitext-2-v1", "ptb", "held-out-news")


def many_sets_source(n: int = 12, **kwargs) -> FakeSource:
    info = RunInfo(model="fake", device="cpu", max_iters=1000, lr=3e-4, eval_names=list(EVAL_SETS))
    return FakeSource([make_record(i, n, eval_names=EVAL_SETS) for i in range(n)], info=info, **kwargs)


def screen_text(app: CollapseApp, width: int, height: int) -> list[str]:
    """The screen's rows as plain text, as a terminal would show them."""
    console = Console(width=width, height=height, file=io.StringIO(), record=True, force_terminal=True)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text().splitlines()


@pytest.mark.parametrize("size", [(120, 24), (132, 20), (100, 18)])
def test_every_chart_is_on_screen_where_the_rows_allow_two_each(size: tuple[int, int]) -> None:
    """120x24 with three evaluation sets drew gen_loss over ten rows and scrolled the rest out of sight
    (charts of height 1fr in a scrolling pane each grew to the pane's height)."""

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 12, "the records")
        await pilot.pause(0.1)
        charts = app.query_one(LossCharts)
        assert charts.size.height >= 2 * len(charts.names)  # the room is there
        view = charts.content_region
        for chart in app.query(SeriesChart):
            assert view.contains_region(chart.region), (chart.title, chart.region, view)
        assert charts.max_scroll_y == 0

    drive(many_sets_source(), scenario, size=size)


def test_charts_that_cannot_have_two_rows_each_keep_two_and_scroll() -> None:
    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 12, "the records")
        await pilot.pause(0.1)
        assert [chart.size.height for chart in app.query(SeriesChart)] == [2, 2, 2, 2]

    drive(many_sets_source(), scenario, size=(80, 16))


def test_a_wide_but_short_screen_keeps_the_event_log_short_and_gives_the_sample_the_rows() -> None:
    heights: dict[int, int] = {}
    for rows in (20, 40):

        async def scenario(app: CollapseApp, pilot: Pilot, rows: int = rows) -> None:
            await wait_until(pilot, lambda: app.records_seen == 12, "the records")
            await pilot.pause(0.1)
            heights[rows] = app.query_one("#events").size.height

        drive(many_sets_source(), scenario, size=(132, rows))
    assert heights[40] > heights[20] == 4  # 10 and 6 rows with their borders


@pytest.mark.parametrize("size", [(60, 30), (70, 20)])
def test_below_80_columns_the_sample_keeps_half_the_width_and_the_footer_quit_and_help(
    size: tuple[int, int],
) -> None:
    """The left column was 42 columns at any width: at 60 the sample was 16 wide; and the footer lost
    its last keys, which were help and quit."""

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 12, "the records")
        await pilot.pause(0.1)
        assert app.query_one("#right").size.width >= size[0] // 2 - 1
        # the footer is composed again as it turns compact: wait for it to be drawn
        await wait_until(pilot, lambda: screen_text(app, *size)[-1].strip() != "", "the footer")
        footer = screen_text(app, *size)[-1]
        assert "q Quit" in footer and "? Help" in footer, footer
        meter = str(app.query_one(RepetitionMeter).render()).splitlines()
        assert len(meter) == 4 and meter[3].startswith("compression ratio"), meter  # no line wrapped

    drive(many_sets_source(), scenario, size=size)


def test_the_status_line_below_80_columns_gives_up_the_rate_and_elapsed_before_the_time_left() -> None:
    class StatusOnly(App):
        def compose(self) -> ComposeResult:
            yield StatusLine()

    async def main(width: int) -> str:
        app = StatusOnly()
        async with app.run_test(size=(width, 3)) as pilot:
            app.query_one(StatusLine).show(
                model="/data/models/SmolLM2-135M-Instruct-finetuned-v2", device="cuda:1", iteration=998,
                max_iters=1000, rate=12.3, lr=1.5e-05, pending_lr=7.5e-06, elapsed=5025, remaining=37425,
            )  # fmt: skip
            await pilot.pause()
            return str(app.query_one(StatusLine).render())

    for width in (70, 60):
        line = asyncio.run(main(width))
        assert len(line) <= width and line.endswith("eta 10:23:45"), line
        assert "it 999/1000" in line and "lr 1.5e-05→7.5e-06" in line, line


def test_a_snapshot_saved_after_loading_shows_in_the_meter_until_its_event() -> None:
    """The engine's "saving snapshot" status went to the loading pane, hidden once the run has
    started: a large model's final snapshot showed nothing for half a minute."""

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 12, "the records")
        app.post_message(StatusReport("saving snapshot iter-12", None))
        await pilot.pause(0.1)
        assert "saving snapshot iter-12" in str(app.query_one(RepetitionMeter).render()).splitlines()[0]
        app.post_message(EventReport(Event("snapshot", 12, time=0.0, data={"path": "/r/snapshots/iter-12"})))
        await pilot.pause(0.1)
        assert "saving" not in str(app.query_one(RepetitionMeter).render())

    drive(many_sets_source(), scenario)


def test_the_meter_counts_a_streak_past_its_patience_in_a_row_not_as_13_of_3() -> None:
    meter = RepetitionMeter(0.9, 3)
    meter.state = "running"
    for _ in range(5):
        meter.detector.update(0.95)
    assert "above threshold 5 in a row" in str(meter.render())
    meter.detector.streak = 2
    assert "above threshold 2/3" in str(meter.render())


def test_a_long_error_is_cut_short_in_its_notice_and_whole_in_the_log() -> None:
    message = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. " + "GPU 0 has a total capacity of 79 GiB " * 12
    )
    source = FakeSource([make_record(0, 5)], fail_with=RuntimeError(message))

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.failed, "the failure")
        await pilot.pause(0.1)
        notices = [n.message for n in app._notifications if n.title == "run failed"]
        assert len(notices) == 1 and len(notices[0]) <= BRIEF_CHARS + 30, notices
        assert notices[0].startswith("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB.")
        assert notices[0].endswith("(whole in the event log)")
        assert message.split()[-1] in log_text(app) and log_text(app).count("total capacity") == 12

    drive(source, scenario, size=(200, 60))


def test_brief_leaves_a_short_message_as_it_is() -> None:
    assert brief("model 'nope' not found") == "model 'nope' not found"
    assert len(brief("x" * 1000)) < BRIEF_CHARS + 30


def test_a_read_only_watcher_says_its_steering_keys_are_off() -> None:
    source = FakeSource([make_record(0, 5)])
    source.controls.read_only = True

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 1, "a record")
        assert [n.title for n in app._notifications] == ["read-only"]

    drive(source, scenario)


def test_watching_a_run_with_no_process_file_shows_no_elapsed_time_of_its_own(tmp_path: Path) -> None:
    """A copied folder, or a run of an old version: the time watched is not the time the run ran."""
    run_dir = make_run(tmp_path / "run", "finished", n=3)
    (run_dir / "process.json").unlink(missing_ok=True)
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)
    ticks = iter(range(0, 10_000, 100))

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the replay to end")
        app._show_status()
        await pilot.pause()
        assert app._elapsed() is None
        assert "0:00 elapsed" not in str(app.query_one(StatusLine).render())

    drive(source, scenario, clock=lambda: float(next(ticks)), size=(120, 30))


def test_the_lr_dialog_says_both_the_running_lr_and_the_one_asked_for() -> None:
    source = FakeSource([make_record(0, 5)], after="live", iteration_s=60.0)  # + waits for a boundary

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 1, "a record")
        await pilot.press("plus")
        await open_lr_dialog(app, pilot)
        text = " ".join(str(label.render()) for label in app.screen.query(Label))
        assert "now 4e-05, 8e-05 asked for" in text, text
        assert app.screen.query_one(Input).value == "8e-05"

    drive(source, scenario)


# -- stepping through history ---------------------------------------------------


def numbered(n: int, total: int) -> list[IterationRecord]:
    """``n`` records whose samples say which iteration they are, so the pane can be checked."""
    records = [make_record(i, total) for i in range(n)]
    for record in records:
        record.text = f"sample of iteration {record.iteration}. " + record.text
    return records


def sample_text(app: CollapseApp) -> str:
    return str(app.query_one("#sample-text", Static).render())


def marker_columns(app: CollapseApp) -> list[list[int]]:
    """Where each chart's ▲ is, one list per chart; empty lists while following (no marker shown)."""
    rows = []
    for marker in app.query(ChartMarker):
        text = str(marker.render()) if marker.display else ""
        rows.append([column for column, char in enumerate(text) if char == "▲"])
    return rows


def reversed_columns(chart: SeriesChart) -> list[int]:
    """The columns of a chart's sparkline drawn in reverse video: the browsed iteration, where the
    chart has no row for its ▲."""
    line = chart.query_one(MarkedSparkline).render_line(0)
    columns, column = [], 0
    for segment in line:
        width = segment.cell_length
        if segment.style is not None and segment.style.reverse:
            columns.extend(range(column, column + width))
        column += width
    return columns


def test_a_chart_without_a_row_for_its_marker_marks_the_browsed_column_in_its_sparkline() -> None:
    evals = ("wikitext-2", "wikitext-2-v1", "ptb", "held")  # five charts in 80x24's rows: some get two
    info = RunInfo(model="fake-model", device="cpu", max_iters=100, lr=4e-5, eval_names=list(evals))
    source = FakeSource([make_record(i, 20, eval_names=evals) for i in range(20)], info=info)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 20, "twenty records")
        charts = list(app.query(SeriesChart))
        assert not any(reversed_columns(chart) for chart in charts)  # following: nothing marked
        await pilot.press("left_curly_bracket")
        await pilot.pause()
        markers = dict(zip(charts, marker_columns(app), strict=True))
        cramped = [chart for chart in charts if chart.size.height < 3]
        roomy = [chart for chart in charts if chart.size.height >= 3]
        assert cramped and roomy
        marked = markers[roomy[0]]
        assert marked  # where the ▲ row fits, the sparkline is left as it is
        assert all(not reversed_columns(chart) and markers[chart] == marked for chart in roomy)
        assert all(reversed_columns(chart) == marked for chart in cramped)

    drive(source, scenario)


def test_history_keys_show_past_samples_and_mark_the_charts() -> None:
    source = FakeSource(numbered(30, 30))

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 30, "thirty records")
        assert isinstance(app.focused, SampleView)  # its own home/end must not take the history keys
        assert marker_columns(app) == [[], []]
        sample = app.query_one(SampleView)

        await pilot.press("left_square_bracket")
        assert app.shown_iteration == 28 and sample_text(app).startswith("sample of iteration 28.")
        assert sample.border_title == "iteration 28 (latest 29)"
        assert "end follows" in str(sample.border_subtitle)
        near_end = marker_columns(app)
        assert near_end[0] and near_end[0] == near_end[1]  # every chart marks the same iteration

        await pilot.press("left_curly_bracket")
        assert app.shown_iteration == 18 and sample_text(app).startswith("sample of iteration 18.")
        assert max(marker_columns(app)[0]) < min(near_end[0])  # the marker moved left

        await pilot.press("home")
        assert app.shown_iteration == 0 and sample_text(app).startswith("sample of iteration 0.")
        assert marker_columns(app)[0][0] == 0
        await pilot.press("left_square_bracket")  # nothing before the first: it stays
        assert app.shown_iteration == 0

        await pilot.press("right_square_bracket", "right_curly_bracket")
        assert app.shown_iteration == 11 and sample_text(app).startswith("sample of iteration 11.")

        await pilot.press("end")
        assert app.browsing is None and sample.border_title == "sample · iteration 29"
        assert sample_text(app).startswith("sample of iteration 29.") and marker_columns(app) == [[], []]

    drive(source, scenario)


def test_stepping_forward_past_the_latest_follows_again() -> None:
    source = FakeSource(numbered(12, 12))

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 12, "twelve records")
        assert app.check_action("follow", ()) is None and app.check_action("step", (1,)) is None
        await pilot.press("left_square_bracket", "left_square_bracket")
        assert app.shown_iteration == 9 and app.check_action("follow", ()) is True
        await pilot.press("right_curly_bracket")
        assert app.browsing is None and app.shown_iteration == 11

    drive(source, scenario)


def test_new_records_while_browsing_do_not_move_the_view() -> None:
    source = FakeSource(numbered(5, 50), after="live", iteration_s=0.1)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen >= 5, "five records")
        await pilot.press("home", "right_square_bracket")
        assert app.shown_iteration == 1
        seen = app.records_seen
        await wait_until(pilot, lambda: app.records_seen >= seen + 5, "five more records")
        sample = app.query_one(SampleView)
        assert app.shown_iteration == 1 and sample_text(app).startswith("sample of iteration 1.")
        latest = app.history.last
        assert latest is not None and latest >= seen + 4
        await wait_until(
            pilot, lambda: f"(latest {app.history.last})" in str(sample.border_title), "the retitle"
        )
        assert marker_columns(app)[0]  # still marked
        await pilot.press("end")
        assert app.browsing is None and str(sample.border_title).startswith("sample · iteration ")
        await pilot.press("q")

    drive(source, scenario)


def test_the_history_keys_leave_a_dialogs_input_alone() -> None:
    source = FakeSource(numbered(5, 5))

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 5, "five records")
        await open_lr_dialog(app, pilot)
        field = app.screen.query_one(Input)
        await pilot.press("home")
        assert field.cursor_position == 0 and app.browsing is None
        await pilot.press("end")
        assert field.cursor_position == len(field.value)

    drive(source, scenario)


def test_a_replayed_run_resumed_from_an_older_snapshot_shows_its_new_branch(tmp_path: Path) -> None:
    """The old branch stopped at 8; a resume from 3 wrote 3, 4, 5 and stopped. In the file the old
    stop comes before the resume: the new 3, 4, 5 must not be drawn before it and then forgotten."""
    run_dir = make_run(tmp_path / "run", "stopped", n=8)
    writer = RunWriter(run_dir, resuming=True)
    writer.write_event(Event("resumed_from", 3, data={"path": str(run_dir / "snapshots" / "iter-3")}))
    writer.write_event(Event("start", 3))
    for i in (3, 4, 5):
        writer.write_record(folder_record(i, gen_loss=9.0 + i, resumed=True))
    writer.write_event(Event("stop", 6, data={"reason": "requested", "status": "stopped"}))
    writer.write_summary({"status": "stopped", "reason": "requested", "iterations": 6})
    writer.close()
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the replay to end")
        assert app.history.iterations == [0, 1, 2, 3, 4, 5]
        assert [row[0] for row in app.drawn] == [0, 1, 2, 3, 4, 5]
        assert app.history[5].record.gen_loss == 14.0  # the new branch's

    drive(source, scenario)


def test_a_watcher_of_an_ended_run_follows_the_resume_that_takes_it_up(tmp_path: Path, monkeypatch) -> None:
    """A resume started after the watcher showed the end (or just before it announced itself, which the
    watcher cannot tell from a run that has ended): the screen follows it, from the resumed iteration."""
    from runfolders import write_process

    monkeypatch.setattr(CollapseApp, "RESUME_POLL_S", 0.05)
    run_dir = make_run(tmp_path / "run", "stopped", n=4)
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the replay to end")
        assert app.state == "stopped"
        write_process(run_dir, os.getpid())  # a resume from iter-2 announces itself (this process stands in)
        await wait_until(pilot, lambda: app.running, "the watcher to follow the resume")
        assert "taken up again" in log_text(app) and app.state == "loading"
        writer = RunWriter(run_dir, resuming=True)
        writer.write_event(Event("resumed_from", 2, data={"path": "iter-2", "lr": 4e-5, "max_iters": 6}))
        writer.write_event(Event("start", 2))
        for i in range(2, 6):
            writer.write_record(folder_record(i, gen_loss=9.0 + i, resumed=True))
        stop = Event("stop", 6, data={"reason": "max_iters", "status": "finished"})
        writer.write_event(stop)
        writer.write_summary(
            {"status": "finished", "reason": "max_iters", "iterations": 6, "stopped": stop.time}
        )
        writer.close()
        write_process(run_dir, os.getpid(), state="ended")
        await wait_until(pilot, lambda: not app.running, "the resumed run to end")
        assert app.state == "finished" and app.info.max_iters == 6
        assert [row[0] for row in app.drawn] == [0, 1, 2, 3, 4, 5]
        assert app.history[5].record.gen_loss == 14.0  # the resumed branch's

    drive(source, scenario)


def test_a_watcher_that_followed_a_resume_which_failed_shows_the_run_as_it_stood(
    tmp_path: Path, monkeypatch
) -> None:
    """No rate from the run before while the resume loads; once it has gone without a line, the screen
    says so and is not left "loading"; what was asked of the run before is not pending any more."""
    from runfolders import dead_pid, write_process

    monkeypatch.setattr(CollapseApp, "RESUME_POLL_S", 0.05)
    run_dir = make_run(tmp_path / "run", "stopped", n=4)
    write_process(run_dir, dead_pid(), state="ended")
    old = (run_dir / "process.json").read_text()
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the replay to end")
        app.requested_lr = 1e-3  # an lr asked of the run before its end, never read
        write_process(run_dir, os.getpid())  # a resume announces itself
        await wait_until(pilot, lambda: app.running, "the watcher to follow the resume")
        assert app._rate() is None and app.requested_lr is None and app.state == "loading"
        (run_dir / "process.json").write_text(old)  # it failed while loading: put back as it was
        await wait_until(pilot, lambda: not app.running, "the watcher to see it gone")
        assert app.state == "stopped" and not app.loading
        assert "the resume ended before its first iteration; the run stands as it was" in log_text(app)

    drive(source, scenario, size=(120, 40))


def test_watching_a_finished_run_shows_how_long_it_ran(tmp_path: Path) -> None:
    """Not how long the watcher has watched (0:00:00 on a replay)."""
    run_dir = make_run(tmp_path / "run", "finished", n=3)
    process = {"pid": 1, "hostname": "elsewhere", "started": 1_000.0, "ended": 4_725.0, "state": "ended"}
    (run_dir / "process.json").write_text(json.dumps(process))
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the replay to end")
        app._show_status()
        await pilot.pause()
        assert "1:02:05" in str(app.query_one(StatusLine).render())

    drive(source, scenario)


def test_a_watched_run_killed_without_a_word_ran_until_its_last_line(tmp_path: Path) -> None:
    """Not until the watcher noticed (a replay of a run killed a week ago would read 168 hours)."""
    from runfolders import dead_pid

    run_dir = tmp_path / "run"
    writer = RunWriter(run_dir)
    writer.write_config({"model": "gpt2", "lr": 4e-5, "max_iters": 10})
    writer.write_event(Event("start", 0, time=1_000.0))
    for i in range(3):
        writer.write_record(folder_record(i))  # at 1000, 1001, 1002
    writer.close()
    process = {"pid": dead_pid(), "hostname": socket.gethostname(), "started": 995.0, "state": "running"}
    (run_dir / "process.json").write_text(json.dumps(process))
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the replay to end")
        assert app.state == "process gone"
        app._show_status()
        await pilot.pause()
        assert "0:00:07" in str(app.query_one(StatusLine).render())

    drive(source, scenario)


def test_watching_a_finished_run_steps_through_its_history(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "finished", n=8)
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the replay to end")
        assert app.state == "finished"
        await pilot.press("home")
        assert sample_text(app) == "sample 0" and marker_columns(app)[0][0] == 0
        await pilot.press("right_curly_bracket")  # 10 forward from 0 is past the last (7): follow
        assert app.browsing is None and sample_text(app) == "sample 7"
        await pilot.press("left_square_bracket")
        assert sample_text(app) == "sample 6"

    drive(source, scenario)


@pytest.mark.parametrize(("status", "state"), [("stopped", "stopped"), ("crashed", "error")])
def test_watching_a_run_that_ended_early_does_not_call_it_finished(
    tmp_path: Path, status: str, state: str
) -> None:
    run_dir = make_run(tmp_path / "run", status, n=3)
    events = (run_dir / "events.jsonl").read_text().splitlines()  # the summary alone must say it
    (run_dir / "events.jsonl").write_text("".join(e + "\n" for e in events if '"error"' not in e))
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the replay to end")
        assert app.state == state
        await pilot.pause()
        assert app.query_one(RepetitionMeter).state == state

    drive(source, scenario)


def test_a_replayed_collapse_is_in_the_log_and_the_state_but_not_a_notice(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "collapsed", n=4, created=time.time() - 3600)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    an_hour_ago = time.time() - 3600
    for event in events:  # the run ended an hour ago
        event["time"] = an_hour_ago
    (run_dir / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "stopped": an_hour_ago}))  # its stop's time
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the replay to end")
        assert app.state == "collapsed" and "collapsed (rep4" in log_text(app)
        assert not [n for n in app._notifications if "collapsed" in (n.title or "")]
        app._show_status()
        await pilot.pause()
        status = str(app.query_one(StatusLine).render())
        assert "– it/s" in status  # no rate for a run that has ended

    drive(source, scenario)


def test_the_rate_leaves_the_status_line_as_the_run_ends_not_at_the_next_tick() -> None:
    records = [replace(make_record(i, 5), time=float(i)) for i in range(5)]
    source = FakeSource(records, after="return")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to end")
        await pilot.pause()
        assert "– it/s" in str(app.query_one(StatusLine).render())

    drive(source, scenario, clock=lambda: 0.0)


@pytest.mark.parametrize("skew_s", [7200.0, -7200.0])
def test_a_watcher_tells_history_from_news_by_the_runs_own_clock(tmp_path: Path, skew_s: float) -> None:
    # The run's host keeps a clock two hours ahead of the watcher's, or behind it (a shared folder,
    # two hosts): its old collapse is still history, and what it writes next is still news.
    run_dir = make_run(tmp_path / "run", "running", n=4, collapse_at=1)
    ahead = time.time() + skew_s
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    for event in events:
        event["time"] = ahead
    (run_dir / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: "collapsed (rep4" in log_text(app), "the replayed collapse")
        await pilot.pause(0.1)
        assert not [n for n in app._notifications if "collapsed" in (n.title or "")]
        with (run_dir / "events.jsonl").open("a") as log:  # a new error, a second later by the run's clock
            log.write(
                json.dumps({"event": "error", "iteration": 4, "time": ahead + 1, "message": "boom"}) + "\n"
            )
        await wait_until(pilot, lambda: any(n.title == "run error" for n in app._notifications), "the notice")

    drive(source, scenario)


def test_a_watched_run_whose_process_is_gone_says_so(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "killed", n=3)
    source = FolderSource(run_dir, read_only=True, poll_s=0.05)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the watcher to see the process gone")
        await pilot.pause(0.05)
        assert app.state == "process gone" and app.query_one(RepetitionMeter).state == "process gone"
        assert "process is gone" in log_text(app)
        assert any("process is gone" in n.title for n in app._notifications)

    drive(source, scenario)


# -- run_app: the entry point the CLI calls -------------------------------------


def test_run_app_reraises_a_user_error_from_loading() -> None:
    with pytest.raises(UserError, match="not found"):
        run_app(user_error_source(), headless=True)


@pytest.mark.parametrize(
    ("name", "terminal_gone"), [("SIGHUP", True), ("SIGHUP", False), ("SIGTERM", False), ("SIGINT", False)]
)
def test_a_hangup_kill_or_kill_int_stops_the_run_and_returns_its_summary(
    name, terminal_gone, monkeypatch
) -> None:
    if not hasattr(signal, name):
        pytest.skip(f"no {name} on this platform")
    number = getattr(signal, name)
    silenced: list[bool] = []  # the real one would point this test process's output at /dev/null
    monkeypatch.setattr("collapse_tui.tui.app.silence_output", lambda: silenced.append(True))
    monkeypatch.setattr("collapse_tui.tui.app.terminal_gone", lambda: terminal_gone)
    source = FakeSource([make_record(i, 5) for i in range(2)])

    def signal_once_running() -> None:
        # after both records, while the fake idles at a boundary: the count is then certain
        deadline = time.monotonic() + DEADLINE_S
        while source.emitted < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), number)

    previous = signal.getsignal(number)
    threading.Thread(target=signal_once_running, daemon=True).start()
    try:
        summary = run_app(source, headless=True)
        after = signal.getsignal(number)
    finally:
        signal.signal(number, previous)
    assert summary == {"status": "stopped", "iterations": 2, "signal": name}
    assert source.events[-1].event == "stop"
    # after a hang-up the kernel's may still come: it is ignored until the process ends
    assert after == (signal.SIG_IGN if name == "SIGHUP" else previous)
    assert bool(silenced) == terminal_gone  # a kill -HUP with the terminal there restores it


def run_app_signalled_twice(first: int, second: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``run_app`` on a run of two records that gets ``first`` once both are in, then ``second`` once the
    first is handled; the run (and so ``run_app``) outlives both signals' handlers."""
    source = FakeSource([make_record(i, 5) for i in range(2)])
    both_handled = threading.Event()
    stop_run = source.run
    handling: list[int] = []  # the signals the app's handler has taken up, in order
    notice = app_module.ignore_later_hangups  # the first thing the handler does with every signal

    def noting(signum: int) -> bool:
        handling.append(signum)
        return notice(signum)

    monkeypatch.setattr(app_module, "ignore_later_hangups", noting)

    def run_until_both_signals_are_in(listener):
        summary = stop_run(listener)
        both_handled.wait(DEADLINE_S)
        return summary

    source.run = run_until_both_signals_are_in

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)

    def signal_twice() -> None:
        wait_for(lambda: source.emitted >= 2)
        signal.pthread_kill(threading.main_thread().ident, first)
        wait_for(lambda: len(handling) >= 1)  # not sooner: two signals pending at once are one
        signal.pthread_kill(threading.main_thread().ident, second)
        # the handler runs on the main thread to its end before the run's end can reach the app
        wait_for(lambda: len(handling) >= 2)
        both_handled.set()

    threading.Thread(target=signal_twice, daemon=True).start()
    return run_app(source, headless=True)


def test_a_kill_before_the_screen_is_up_still_ends_the_app(monkeypatch) -> None:
    """A SIGTERM between run_app's handlers and the screen's mount stops the run, and the app leaves."""
    source = FakeSource([make_record(i, 5) for i in range(3)])
    mount = CollapseApp.on_mount
    apps: list[CollapseApp] = []

    def killed_then_mounted(self: CollapseApp) -> None:
        apps.append(self)
        signal.raise_signal(signal.SIGTERM)  # its handler runs here, before the screen has its loop
        mount(self)

    monkeypatch.setattr(CollapseApp, "on_mount", killed_then_mounted)
    hung: list[bool] = []

    def end_a_hung_app() -> None:  # without the fix the app waits for a q forever: end it, and fail
        hung.append(True)
        apps[0].call_from_thread(apps[0].exit, None)

    watchdog = threading.Timer(DEADLINE_S, end_a_hung_app)
    watchdog.start()
    try:
        summary = run_app(source, headless=True)
    finally:
        watchdog.cancel()
    assert not hung
    assert summary["signal"] == "SIGTERM"


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_a_hang_up_after_a_kill_stays_ignored_until_the_process_ends(monkeypatch) -> None:
    # kill, then the session drops: the hang-up is no second signal, and the kernel's may follow
    monkeypatch.setattr("collapse_tui.tui.app.silence_output", lambda: None)
    monkeypatch.setattr("collapse_tui.tui.app.terminal_gone", lambda: False)
    previous = signal.getsignal(signal.SIGHUP)
    try:
        summary = run_app_signalled_twice(signal.SIGTERM, signal.SIGHUP, monkeypatch)
        after = signal.getsignal(signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert summary == {"status": "stopped", "iterations": 2, "signal": "SIGTERM"}
    assert after == signal.SIG_IGN


def test_a_second_sigterm_changes_nothing_while_the_run_stops(monkeypatch) -> None:
    # a scheduler (SLURM, systemd) signals every process of a job: a second SIGTERM is no "leave now"
    left_at_once: list[int] = []
    real_kill = os.kill

    def kill(pid: int, signum: int) -> None:  # the app's "leave now" kills itself: record it instead
        if pid == os.getpid() and signum == signal.SIGTERM and signal.getsignal(signum) == signal.SIG_DFL:
            left_at_once.append(signum)
            return
        real_kill(pid, signum)

    monkeypatch.setattr(os, "kill", kill)
    summary = run_app_signalled_twice(signal.SIGTERM, signal.SIGTERM, monkeypatch)
    assert summary == {"status": "stopped", "iterations": 2, "signal": "SIGTERM"}
    assert left_at_once == []


# -- the pieces ----------------------------------------------------------------


def test_downsampled_series_drops_non_finite_values_and_stays_bounded() -> None:
    series = Downsampled(capacity=64)
    for i in range(10_000):
        series.add(float("nan") if i % 100 == 0 else (math.inf if i == 5 else float(i)))
    data = series.data()
    assert len(data) <= 65 and all(math.isfinite(v) for v in data)
    assert series.bad == 101 and series.min == 1.0 and series.max == 9999.0
    assert data == sorted(data)  # averaging keeps the shape of a rising series
    assert Downsampled().data() == []


def test_downsampled_series_knows_which_point_holds_each_value() -> None:
    series = Downsampled(capacity=8)
    assert series.point_of(0) is None
    for i in range(22):
        series.add(math.nan if i == 3 else float(i))
    # merged twice: points of 4 values from ordinals 0 (skipping the NaN at 3), 5, 9, 13, 17; 21 partial
    assert series.stride == 4 and len(series.data()) == 6
    ordinals = (0, 3, 4, 5, 8, 9, 20, 21)
    assert [series.point_of(i) for i in ordinals] == [0, 0, 0, 1, 1, 2, 4, 5]


@pytest.mark.parametrize(("count", "width"), [(2, 10), (7, 38), (24, 38), (38, 38), (100, 38), (257, 40)])
def test_sparkline_columns_match_what_the_sparkline_draws(count: int, width: int) -> None:
    console = Console(width=width, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    for index in {0, 1, count // 3, count - 2, count - 1}:
        data = [1.0 if i == index else 0.0 for i in range(count)]
        with console.capture() as capture:
            console.print(SparklineRenderable(data, width=width))
        drawn = [column for column, char in enumerate(capture.get().rstrip("\n")) if char == "█"]
        assert sparkline_columns(index, count, width) == drawn, (index, count, width)


def test_sample_history_is_bounded_and_keeps_the_start() -> None:
    history = SampleHistory(capacity=100)
    for i in range(1_000):
        history.add(i, make_record(i, 1_000))
    assert len(history) <= 100 and history.first == 0 and history.last == 999
    assert history.iterations[-40:] == list(range(960, 1_000))  # the recent past stays complete
    assert history.iterations == sorted(history.iterations)
    assert history.before(999) == 998 and history.after(998) == 999 and history.after(999) is None
    assert history.before(0) == 0 and history.before(999, by=10_000) == 0
    entry = history.get(999)
    assert entry is not None and entry.ordinal == 999


def test_sample_history_after_a_rewind_drops_the_abandoned_future() -> None:
    history = SampleHistory()
    for i in range(6):
        history.add(i, make_record(i, 6))
    history.add(6, make_record(3, 6))  # a run resumed from the snapshot before iteration 3
    assert history.iterations == [0, 1, 2, 3] and history[3].ordinal == 6


def test_control_characters_of_a_sample_are_shown_not_sent_to_the_terminal() -> None:
    raw = "red \x1b[31mREDMARK\x1b]0;TITLE\x07 gone \x1b[?1049l bell\x07 del\x7f c1\x9b end\r\n\tnext"
    assert visible_controls(raw) == (
        "red \u241b[31mREDMARK\u241b]0;TITLE\u2407 gone \u241b[?1049l bell\u2407 del\u2421 c1\ufffd end\u240d\n\tnext"
    )
    # the sample pane draws highlight_repeats' text
    assert "\x1b" not in highlight_repeats(raw).plain and "\u241b[31mREDMARK" in highlight_repeats(raw).plain


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (80, "wikitext-2-v1.valid 10.9  min 7.82 max 11.2"),
        (38, "wikitext-2-v1.valid 10.9 ↓7.82 ↑11.2"),
        (30, "wikitext-2-v… 10.9 ↓7.82 ↑11.2"),
    ],
)
def test_a_series_caption_keeps_its_numbers_when_narrow(width: int, expected: str) -> None:
    series = Downsampled()
    for value in (7.82, 10.9, 11.2, 10.9):
        series.add(value)
    assert series_caption("wikitext-2-v1.valid", series, width).plain == expected


def test_a_series_caption_counts_non_finite_values() -> None:
    series = Downsampled()
    for value in (3.0, float("nan"), 2.0):
        series.add(value)
    assert series_caption("gen_loss", series, 80).plain == "gen_loss 2  min 2 max 3  (1 non-finite)"
    assert series_caption("gen_loss", series, 24).plain == "gen_loss 2 ↓2 ↑3 (1 bad)"


@pytest.mark.parametrize(
    ("sample", "shown"),
    [
        ("\n" * 400 + "end", "⏎ ×400\nend"),
        ("a b\n\n\n\nc", "a b\n⏎ ×4\nc"),
        ("x\n\ny", "x\n\ny"),
        ("\n\n\n", "⏎ ×3"),
    ],
)
def test_a_run_of_newlines_is_shown_counted_not_as_empty_rows(sample: str, shown: str) -> None:
    """GPT-2 from the paper's prompt can collapse into newlines: the pane looked empty."""
    assert highlight_repeats(sample).plain == shown


def test_highlight_marks_only_repeated_word_runs() -> None:
    text = highlight_repeats("one a b c d two a b c d three")
    marked = {text.plain[span.start : span.end] for span in text.spans}
    assert marked == {"a b c d"}
    assert highlight_repeats("no loops in this short line").spans == []


@pytest.mark.parametrize(
    ("sample", "looping"),
    [
        ("Then: reenreenreenreenreenreenreenreenreen", "reenreenreenreenreenreenreenreenreen"),
        ("Then: Treenreenreenreenreenreenreenreenreen", "reenreenreenreenreenreenreenreenreen"),
        ("Then: 2reenreenreenreenreenreenreenreenreen", "reenreenreenreenreenreenreenreenreen"),
        ("It was greatttttttttt", "tttttttttt"),
        ("It was great!!!!!!!!!", "!!!!!!!!!"),
        ("a line\n----------------", "----------------"),
        ("x, y, z, x, y, z, x, y, z", "x, y, z, x, y, z, x, y, z"),
    ],
)
def test_highlight_marks_loops_without_spaces(sample: str, looping: str) -> None:
    # A collapsed sample is often one run with no spaces in it: it must not look unrepeated.
    text = highlight_repeats(sample)
    marked = [text.plain[span.start : span.end] for span in text.spans]
    assert marked == [looping]
    assert highlight_repeats("hahaha, committee bookkeeper").spans == []
    assert highlight_repeats("It cost 1000000 dollars, 1000000 more").spans == []  # numbers are not loops


def test_a_resumed_run_counts_its_streak_above_the_threshold_once(tmp_path: Path) -> None:
    # before the resume: rep4 0.1, 0.2, 0.95; the first resumed iteration 0.95 again: two in a row
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"model": "m", "lr": 4e-5, "evals": ["ptb"], "max_iters": 9})
    for i, rep4 in enumerate((0.1, 0.2, 0.95)):
        writer.write_record(dataclasses.replace(folder_record(i, evals=("ptb",)), rep4=rep4))
    writer.close()
    info = RunInfo(
        model="m", device="cpu", max_iters=9, lr=4e-5, eval_names=["ptb"], run_dir=str(tmp_path / "run")
    )
    resumed = Event("resumed_from", 3, data={"path": str(tmp_path / "run" / "snapshots" / "iter-3")})
    first = dataclasses.replace(folder_record(3, evals=("ptb",)), rep4=0.95)
    source = FakeSource([first], info=info, script={0: [resumed]})

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: len(app.drawn) == 4, "the resumed iteration after the earlier three")
        assert [row[0] for row in app.drawn] == [0, 1, 2, 3]
        await pilot.pause()
        assert app.query_one(RepetitionMeter).detector.streak == 2

    drive(source, scenario)


# -- the real engine inside the app ------------------------------------------------


def test_a_run_resumed_on_this_screen_shows_what_it_did_before_the_resume(tiny_config, tmp_path) -> None:
    from collapse_tui.cli import build_config
    from collapse_tui.engine import Engine
    from collapse_tui.runfolder import read_run

    tiny_config.out = str(tmp_path / "run")
    tiny_config.max_iters = 3
    Engine(tiny_config).run()  # its final snapshot is snapshots/iter-3
    before = read_run(tmp_path / "run").records
    engine = Engine(build_config({"resume": tmp_path / "run" / "snapshots" / "iter-3", "max_iters": 5}))

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the resumed run to end")
        assert [row[0] for row in app.drawn] == [0, 1, 2, 3, 4]
        assert app.drawn[0][2][0] == before[0].gen_loss  # the first point is the first iteration's
        assert app.history.iterations == [0, 1, 2, 3, 4]  # home steps back to iteration 0
        log = log_text(app)
        assert log.index("it 3: stopped (max_iters)") < log.index("it 3: resumed from snapshots/iter-3")

    drive(engine, scenario)


def test_a_second_resume_from_further_back_logs_the_first_and_not_what_it_abandons(
    tiny_config, tmp_path
) -> None:
    """This resume's resumed_from is held from the file until its first record: the screen's look at the
    folder must add it itself, to keep the earlier resume and drop what this one abandons."""
    from collapse_tui.cli import build_config
    from collapse_tui.engine import Engine

    tiny_config.out, tiny_config.max_iters, tiny_config.snapshot_every = str(tmp_path / "run"), 4, 1
    Engine(tiny_config).run()
    snapshots = tmp_path / "run" / "snapshots"
    Engine(build_config({"resume": snapshots / "iter-3", "max_iters": 5})).run()
    engine = Engine(build_config({"resume": snapshots / "iter-2", "max_iters": 3}))

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the resumed run to end")
        log = log_text(app)
        assert "it 3: resumed from snapshots/iter-3" in log and "it 2: resumed from snapshots/iter-2" in log
        assert "iter-4" not in log and "iter-5" not in log  # the snapshots of the iterations it abandons

    drive(engine, scenario, size=(120, 60))


def test_real_engine_on_a_tiny_model_steered_from_the_keys(tiny_config) -> None:
    from collapse_tui.engine import Engine
    from collapse_tui.runfolder import read_run

    tiny_config.max_iters = 500  # far more than the test lets it run: q ends it
    engine = Engine(tiny_config)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen >= 1, "a first iteration")
        await pilot.press("plus")
        await wait_until(pilot, lambda: app.applied_lr == 2e-3 and app.requested_lr is None, "lr doubled")
        await pilot.press("s")
        await wait_until(pilot, lambda: any(Path(engine.run_dir, "snapshots").glob("*/screen.svg")), "screen")
        await pilot.press("space")
        await wait_until(pilot, lambda: any(e.event == "pause" for e in app.events), "the pause event")
        assert app.state == "paused"
        records_when_paused = app.records_seen
        await pilot.pause(0.3)
        assert app.records_seen == records_when_paused
        await pilot.press("q")
        await wait_until(pilot, lambda: not app.is_running, "the app to exit")

    app = drive(engine, scenario)
    assert app.return_value is not None and app.return_value["status"] == "stopped"
    run = read_run(engine.run_dir)
    assert run.summary is not None and run.summary["lr"] == 2e-3
    kinds = [e.event for e in run.events]
    assert {"start", "lr", "snapshot", "pause", "stop"} <= set(kinds)
    assert run.records[0].lr == 1e-3 and run.records[-1].lr == 2e-3
    assert app.records_seen == len(run.records)


def test_while_help_is_open_the_footer_offers_none_of_the_keys_it_swallows_but_q_still_quits() -> None:
    source = FakeSource()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        assert app.check_action("pause", ()) is True and app.check_action("quit", ()) is True
        await pilot.press("question_mark")
        for action in ("pause", "lr_up", "snapshot", "help"):
            assert app.check_action(action, ()) is False
        assert app.check_action("quit", ()) is True  # help lists q as "quit": it does
        await pilot.press("escape")
        assert app.check_action("pause", ()) is True
        await pilot.press("question_mark")
        await pilot.press("q")
        await wait_until(pilot, lambda: source.controls.stop_requested, "the stop q asks for")

    drive(source, scenario)


def help_text(app: CollapseApp) -> str:
    """The key list the open help screen shows, as lines of key and meaning."""
    return "\n".join(f"{key}  {what}" for key, what in app.screen.keys)


def test_a_watcher_that_quits_says_the_run_goes_on_not_that_it_stops(tmp_path: Path) -> None:
    """Its last frame read STOPPING and "stopping…", though quitting a watcher never stops the run."""
    run_dir = make_run(tmp_path / "run", "running", n=3)
    source = FolderSource(run_dir, poll_s=0.05)
    states: list[str] = []

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 3, "the run's records")
        original = app._update_state

        def noting_each_state() -> None:
            states.append(app.state)
            original()

        app._update_state = noting_each_state  # type: ignore[method-assign]
        await pilot.press("q")
        await pilot.pause(0.2)
        assert "stopping" not in log_text(app) and "leaving; the run goes on" in log_text(app)

    app = drive(source, scenario)
    assert states and "stopping" not in states, states
    assert app.state == "running"


def test_a_watchers_help_says_q_leaves_the_run_going_and_a_read_only_one_lists_no_steering_keys() -> None:
    own = FakeSource([make_record(0, 5)])
    watched = FakeSource([make_record(0, 5)])
    watched.controls.stops_the_run = False  # what a watcher's controls say
    watched.controls.read_only = True
    texts: list[str] = []

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 1, "a record")
        await pilot.press("question_mark")
        await pilot.pause()
        texts.append(help_text(app))

    drive(own, scenario)
    drive(watched, scenario)
    assert "stop the run (its folder is completed) and quit" in texts[0] and "double the learning" in texts[0]
    assert "stop watching and quit (the run goes on)" in texts[1]
    assert "stop the run" not in texts[1] and "double the learning" not in texts[1]
    assert "previous / next iteration's sample" in texts[1]


def test_the_help_of_a_run_that_has_ended_offers_no_steering() -> None:
    source = FakeSource([make_record(i, 3) for i in range(3)], after="return")  # ends by itself
    texts: list[str] = []

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to end")
        await pilot.press("question_mark")
        await pilot.pause()
        texts.append(help_text(app))
        await pilot.press("q")

    drive(source, scenario)
    assert "quit (the run has ended)" in texts[0] and "save this screen as an SVG into" in texts[0]
    assert "double the learning" not in texts[0] and "pause / resume" not in texts[0]
    assert "the run goes on" not in texts[0] and "stop the run" not in texts[0]


def test_a_status_tick_while_the_screen_is_torn_down_does_nothing() -> None:
    """The once-a-second status update can fire after an exit has removed the status line (seen once in CI)."""
    source = FakeSource([make_record(0, 5)])

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 1, "the record")
        await app.query_one(StatusLine).remove()
        app._show_status()  # raised NoMatches before

    drive(source, scenario)


STATUS_CASES = [
    # (model, device, iteration, pending lr): what must stay on an 80-column line
    ("gpt2-medium", "cuda:0", 11, None, ["gpt2-medium", "cuda:0", "it 12/1000", "eta 8:14"]),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "cuda:0", 11, None, ["SmolLM2-135M-Instruct", "eta 8:14"]),
    ("Qwen/Qwen2.5-0.5B-Instruct", "cuda:0", 4320, 8e-5, ["Qwen2.5-0.5B-In", "it 4321/10000", "eta 8:14"]),
]


@pytest.mark.parametrize(("model", "device", "iteration", "pending", "kept"), STATUS_CASES)
def test_the_status_line_keeps_the_time_left_at_80_columns(model, device, iteration, pending, kept) -> None:
    """It gives up labels, zero hours, the device and the model's tail, in that order, never the time left."""

    class StatusOnly(App):
        def compose(self) -> ComposeResult:
            yield StatusLine()

    async def main() -> str:
        app = StatusOnly()
        async with app.run_test(size=(80, 3)) as pilot:
            app.query_one(StatusLine).show(
                model=model, device=device, iteration=iteration, max_iters=10000 if pending else 1000,
                rate=2.0, lr=4e-5, pending_lr=pending, elapsed=5.0, remaining=494.0,
            )  # fmt: skip
            await pilot.pause()
            return str(app.query_one(StatusLine).render())

    line = asyncio.run(main())
    assert len(line) <= 80 and line.endswith("eta 8:14")
    assert all(part in line for part in kept), line


def test_a_kill_after_the_run_has_ended_only_closes_the_screen(monkeypatch) -> None:
    """The run finished and its screen was left open; a kill (or the SSH session ending) then is no
    interruption: the summary, and so the exit code, stay the run's own."""
    monkeypatch.setattr("collapse_tui.tui.app.terminal_gone", lambda: False)
    source = FakeSource([make_record(i, 5) for i in range(2)], after="return")
    apps: list[CollapseApp] = []
    made = CollapseApp.__init__

    def remember(self: CollapseApp, *args, **kwargs) -> None:
        made(self, *args, **kwargs)
        apps.append(self)

    monkeypatch.setattr(CollapseApp, "__init__", remember)

    def kill_once_finished() -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not (apps and apps[0].run_done.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the app has seen the run end
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_once_finished, daemon=True).start()
    summary = run_app(source, headless=True)
    assert summary == {"status": "finished", "iterations": 2}


def test_s_keeps_the_screen_in_the_folder_shown_not_where_the_event_says(tmp_path: Path) -> None:
    """A copied run (or one written from another working folder) names its snapshots as its process
    spelled them: the screen goes into the snapshot of that name in the folder on screen."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    for root in (original, copy):
        (root / "snapshots" / "iter-2").mkdir(parents=True)
    info = RunInfo(
        model="fake", device="cpu", max_iters=2, lr=4e-5, eval_names=["wikitext-2"], run_dir=str(copy)
    )
    written_as = str(original / "snapshots" / "iter-2")
    script = {1: [Event("snapshot", 2, time=0.0, data={"path": written_as})]}
    source = FakeSource([make_record(i, 2) for i in range(2)], info=info, script=script, after="return")

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to end")
        await pilot.press("s")
        await wait_until(pilot, lambda: (copy / "snapshots" / "iter-2" / "screen.svg").exists(), "the screen")

    drive(source, scenario)
    assert not (original / "snapshots" / "iter-2" / "screen.svg").exists()


def ended_with_a_snapshot(run_dir: Path) -> tuple[FakeSource, Path]:
    """A two-iteration run in ``run_dir`` that ends with its final snapshot's event, and that snapshot's path."""
    snapshot = run_dir / "snapshots" / "iter-2"
    info = RunInfo(
        model="fake", device="cpu", max_iters=2, lr=4e-5, eval_names=["wikitext-2"], run_dir=str(run_dir)
    )
    script = {1: [Event("snapshot", 2, time=0.0, data={"path": str(snapshot)})]}
    return FakeSource(
        [make_record(i, 2) for i in range(2)], info=info, script=script, after="return"
    ), snapshot


def test_once_the_run_has_ended_s_keeps_the_screen_beside_its_last_snapshot(tmp_path: Path) -> None:
    source, snapshot = ended_with_a_snapshot(tmp_path)
    snapshot.mkdir(parents=True)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to end")
        assert app.check_action("snapshot", ()) is True
        assert not (snapshot / "screen.svg").exists()
        await pilot.press("s")
        await wait_until(pilot, lambda: (snapshot / "screen.svg").exists(), "the screen saved")
        assert not source.controls.take_pending().snapshot  # no model snapshot asked of a run that has ended
        first = (snapshot / "screen.svg").read_bytes()
        app.query_one("#sample-text", Static).update("the screen has changed since")
        await pilot.press("s")  # again, or a watcher later: a new file, never over the one saved before
        await wait_until(pilot, lambda: (snapshot / "screen-2.svg").exists(), "the second screen")
        assert (snapshot / "screen.svg").read_bytes() == first

    drive(source, scenario)


def test_once_the_run_has_ended_s_keeps_the_screen_in_its_folder_if_its_last_snapshot_is_gone(
    tmp_path: Path,
) -> None:
    """A disk cleaned up by hand: "could not save the screen: No such file or directory" before."""
    source, snapshot = ended_with_a_snapshot(tmp_path)  # its folder never made here

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to end")
        assert not snapshot.exists()
        await pilot.press("s")
        await wait_until(
            pilot, lambda: (tmp_path / "screen.svg").exists(), "the screen saved in the run folder"
        )

    drive(source, scenario)


def test_the_runs_last_events_arriving_as_the_app_shuts_down_with_help_open_do_no_harm() -> None:
    """Found by rendering the help at 80x24: the stop event came while the screens were being removed."""
    source = FakeSource()

    async def main() -> None:
        app = CollapseApp(source)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.worker_started and not app.loading, "the start")
            await pilot.press("question_mark")
            await pilot.pause(0.1)
            source.controls.stop()  # the run's stop event now races the shutdown run_test begins

    for _ in range(3):
        asyncio.run(main())


def test_the_rate_after_a_resume_leaves_out_the_time_the_run_was_not_running() -> None:
    records = [make_record(i, 6) for i in range(4)]  # two records a second
    for later in records[2:]:
        later.time += 3600.0  # resumed an hour after it stopped
    script = {2: [Event("resumed_from", 2, time=0.0, data={"path": "run/snapshots/iter-2"})]}
    source = FakeSource(records, script=script)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 4, "four records")
        assert app._rate() == pytest.approx(2.0)

    drive(source, scenario)


def test_a_watcher_given_a_relative_folder_shows_snapshot_paths_short(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the run wrote absolute paths; the watcher was given "run"
    info = RunInfo(model="m", device="cpu", max_iters=9, lr=1e-3, eval_names=["ptb"], run_dir="run")
    path = str(tmp_path / "run" / "snapshots" / "iter-1")
    script = {1: [Event("snapshot", 1, time=0.0, data={"path": path})]}
    source = FakeSource([make_record(i, 5) for i in range(2)], info=info, script=script)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 2, "two records")
        assert "it 1: snapshot → snapshots/iter-1" in log_text(app)

    drive(source, scenario)
