"""Functional tests of the live TUI: press keys, check what the run received and what the screen shows.

The run is a ``FakeSource`` (tests/fakes.py) that honours the controls the
way the engine does, so these tests need no model and run in about a second.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from fakes import FakeSource, make_record, user_error_source
from runfolders import make_run
from textual.pilot import Pilot
from textual.widgets import Input, Label, Sparkline

from collapse_tui.errors import UserError
from collapse_tui.follow import FolderSource
from collapse_tui.records import Event
from collapse_tui.source import RunInfo
from collapse_tui.tui.app import CollapseApp, run_app
from collapse_tui.tui.screens import LrScreen, parse_lr
from collapse_tui.tui.widgets import Downsampled, LossCharts, RepetitionMeter, highlight_repeats

#: A generous bound for things that take milliseconds; it only matters when something hangs.
DEADLINE_S = 10.0


async def wait_until(pilot: Pilot, predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.01)


def drive(source: FakeSource, scenario: Callable[[CollapseApp, Pilot], Awaitable[None]]) -> CollapseApp:
    """Run the app on ``source`` at 80x24 through ``scenario``; return the app once it has closed."""
    app = CollapseApp(source, clock=lambda: 0.0)

    async def main() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await scenario(app, pilot)

    asyncio.run(main())
    return app


def log_text(app: CollapseApp) -> str:
    """The event pane's text, its wrapped lines joined again."""
    return " ".join(strip.text.strip() for strip in app.query_one("#events").lines)


async def started(app: CollapseApp, pilot: Pilot) -> None:
    await wait_until(pilot, lambda: not app.loading, "the run to start")


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
        titles = [str(label.render()) for label in app.query(".series-title").results(Label)]
        assert titles[0].startswith("gen_loss 0.05") and "max 3.05" in titles[0]
        meter = app.query_one(RepetitionMeter)
        assert meter.rep4 == pytest.approx(records[-1].rep4)
        assert meter.state == "running"
        assert app.query_one("#sample").border_title == "sample · iteration 9"
        status = str(app.query_one("#status").render())
        assert "tiny" in status and "it 9/100" in status and "2.00 it/s" in status
        assert not app.query_one("#loading").display

    drive(FakeSource(records, info=info), scenario)


def test_loading_shows_progress_and_greys_out_run_keys() -> None:
    gate = threading.Event()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        label = app.query_one("#loading-label", Label)
        await wait_until(pilot, lambda: "fake model" in str(label.render()), "the loading message")
        assert app.state == "loading"
        assert app.check_action("pause", ()) is None  # shown, greyed
        assert app.check_action("snapshot", ()) is None
        await pilot.press("space", "plus")
        assert not app.source.controls.paused and app.source.controls.pending_lr is None
        gate.set()
        await started(app, pilot)
        assert app.state == "running" and app.check_action("pause", ()) is True

    drive(FakeSource(load_gate=gate), scenario)


# -- the keys ------------------------------------------------------------------


def test_space_pauses_and_p_resumes() -> None:
    source = FakeSource()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await pilot.press("space")
        assert source.controls.paused and app.state == "paused"
        await wait_until(pilot, lambda: "pause" in [e.event for e in source.events], "the pause event")
        # the footer now offers resume instead of pause
        assert app.check_action("pause", ()) is False and app.check_action("resume", ()) is True
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


def test_typed_lr_is_applied() -> None:
    source = FakeSource()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await pilot.press("l")
        await wait_until(pilot, lambda: isinstance(app.screen, LrScreen), "the lr dialog")
        app.screen.query_one(Input).value = ""
        await pilot.press(*"1e-3", "enter")
        await wait_until(pilot, lambda: source.lr_changes == [1e-3], "the typed lr applied")
        assert not isinstance(app.screen, LrScreen)

    drive(source, scenario)


def test_bad_typed_lr_is_refused_with_the_error_shown() -> None:
    source = FakeSource()

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await started(app, pilot)
        await pilot.press("l")
        await wait_until(pilot, lambda: isinstance(app.screen, LrScreen), "the lr dialog")
        app.screen.query_one(Input).value = ""
        await pilot.press(*"fast", "enter")
        assert isinstance(app.screen, LrScreen)  # still open
        assert "not a number" in str(app.screen.query_one("#lr-error", Label).render())
        app.screen.query_one(Input).value = ""
        await pilot.press(*"-1", "enter")
        assert "positive" in str(app.screen.query_one("#lr-error", Label).render())
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


def test_snapshot_saves_a_screenshot_in_the_snapshot_folder(tmp_path: Path) -> None:
    info = RunInfo(model="m", device="cpu", max_iters=9, lr=1e-3, eval_names=["ptb"], run_dir=str(tmp_path))
    source = FakeSource([make_record(i, 5) for i in range(3)], info=info, snapshot_root=tmp_path)

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.records_seen == 3, "three records")
        await pilot.press("s")
        await wait_until(pilot, lambda: bool(source.snapshots), "the snapshot")
        svg = source.snapshots[0] / "screen.svg"
        await wait_until(pilot, svg.exists, "screen.svg")
        assert svg.read_text(encoding="utf-8").lstrip().startswith("<svg")
        assert "snapshot → snapshots/iter-" in log_text(app)  # shown inside the run folder

    drive(source, scenario)


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

    started_at = time.monotonic()
    app = drive(source, scenario)
    assert time.monotonic() - started_at < 30, "quit waited for the iteration"
    assert source.stopped_mid_iteration
    assert app.return_value == {"status": "stopped", "iterations": 0}
    assert source.events[-1].event == "stop"


def test_collapse_keeps_the_screen_until_q() -> None:
    records = [make_record(i, 6) for i in range(6)]
    script = {5: [Event("collapse", 5, time=0.0, data={"rep4": 0.95})]}
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


def test_a_crashed_run_shows_error_and_stays() -> None:
    source = FakeSource(fail_with=RuntimeError("CUDA exploded"))

    async def scenario(app: CollapseApp, pilot: Pilot) -> None:
        await wait_until(pilot, lambda: not app.running, "the run to fail")
        await pilot.pause(0.05)
        assert app.state == "error" and app.is_running
        assert "run failed: RuntimeError: CUDA exploded" in log_text(app)

    drive(source, scenario)


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


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_hangup_stops_the_run_and_returns_its_summary() -> None:
    source = FakeSource([make_record(i, 5) for i in range(2)])

    def hang_up_once_running() -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not any(e.event == "start" for e in source.events) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGHUP)

    previous = signal.getsignal(signal.SIGHUP)
    threading.Thread(target=hang_up_once_running, daemon=True).start()
    summary = run_app(source, headless=True)
    assert summary == {"status": "stopped", "iterations": 2}
    assert source.events[-1].event == "stop"
    assert signal.getsignal(signal.SIGHUP) == previous


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


def test_highlight_marks_only_repeated_word_runs() -> None:
    text = highlight_repeats("one a b c d two a b c d three")
    marked = {text.plain[span.start : span.end] for span in text.spans}
    assert marked == {"a b c d"}
    assert highlight_repeats("no loops in this short line").spans == []


# -- the real engine inside the app ------------------------------------------------


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
