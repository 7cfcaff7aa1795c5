"""The live TUI: runs a ``RunSource`` in a thread worker and draws what it reports.

The run (the engine, or a fake in tests) lives entirely behind ``RunSource``:
its ``run`` blocks in a Textual thread worker and reports through a listener
that only posts messages, so the UI thread never waits on the model. Keys
steer the run through ``source.controls``, which the engine applies at the
next iteration boundary and reports back as events; the UI trusts those
events, not its own key presses, for what has actually happened.

The samples of past iterations are kept (bounded, ``SampleHistory``) so the
history keys can step back through them while the run goes on; new records
then update everything but the sample pane, so browsing is never yanked to
the latest iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import sys
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.driver import Driver
from textual.errors import NoWidget
from textual.message import Message
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Label, ProgressBar
from textual.worker import Worker, WorkerState

from collapse_tui.errors import ScreenCrashed, UserError
from collapse_tui.exits import (
    STOP_SIGNAL_NAMES,
    changes_nothing_once_stopping,
    ignore_later_hangups,
    pass_on_early_interrupt,
)
from collapse_tui.follow import began_after_read
from collapse_tui.metrics import format_rep4
from collapse_tui.records import Event, IterationRecord
from collapse_tui.runfolder import SNAPSHOTS, drop_abandoned_events, read_run, write_atomic
from collapse_tui.source import RunSource
from collapse_tui.tui.history import Entry, SampleHistory
from collapse_tui.tui.screens import MAX_LR, HelpScreen, LrScreen, help_keys
from collapse_tui.tui.terminal import hangup_safe, restore_terminal, silence_output, terminal_gone
from collapse_tui.tui.widgets import (
    EventLog,
    FittingFooter,
    LossCharts,
    RepetitionMeter,
    SampleView,
    StatusLine,
)

#: The most characters of a message a notice shows; the event log keeps it whole.
BRIEF_CHARS = 160


def brief(message: str) -> str:
    """``message`` cut for a notice: a CUDA out-of-memory error runs to ~450 characters, which at
    80×24 covered half the screen for the notice's 30 seconds."""
    if len(message) <= BRIEF_CHARS:
        return message
    return message[: BRIEF_CHARS - 1].rstrip() + "… (whole in the event log)"


class StatusReport(Message):
    """Loading progress from the run's thread."""

    def __init__(self, text: str, fraction: float | None) -> None:
        super().__init__()
        self.text = text
        self.fraction = fraction


class RecordReport(Message):
    """One finished iteration from the run's thread."""

    def __init__(self, record: IterationRecord) -> None:
        super().__init__()
        self.record = record


class EventReport(Message):
    """An event (pause, lr, snapshot, collapse, stop, error, …) from the run's thread."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class AppListener:
    """The ``EngineListener`` the app hands the run: it only posts messages (thread-safe).

    After the app has closed its loop, posting raises; the run must not die
    of that while it writes its summary, so those messages are dropped.
    """

    def __init__(self, app: App) -> None:
        self.app = app

    def _post(self, message: Message) -> None:
        with contextlib.suppress(RuntimeError):
            self.app.post_message(message)

    def on_status(self, message: str, fraction: float | None = None) -> None:
        self._post(StatusReport(message, fraction))

    def on_record(self, record: IterationRecord) -> None:
        self._post(RecordReport(record))

    def on_event(self, event: Event) -> None:
        self._post(EventReport(event))


#: The id Textual gives every screen's container of notices (textual/screen.py); a screen saved
#: as SVG leaves it out. Should a Textual release rename it, the notices are simply drawn.
TOAST_RACK_ID = "textual-toastrack"

#: Printed under the screen when the app has left it and the run is still stopping.
WAITING_MESSAGE = "collapse-tui: waiting for the run to stop at a safe point (it may be saving a snapshot)…"

#: The keys that steer the run, hidden when the source is read-only.
STEERING_ACTIONS = frozenset({"pause", "resume", "lr_up", "lr_down", "type_lr", "snapshot"})
#: The keys that step through past samples; they work on a finished or read-only run too.
HISTORY_ACTIONS = frozenset({"step", "first", "follow"})


def free_screen_name(folder: Path) -> str:
    """``screen.svg``, or ``screen-2.svg``, ``screen-3.svg``, … beside one already there.

    A screen saved later (``s`` on a run that has ended, from its own screen
    or a watcher's) must not replace one a researcher saved at the moment.
    """
    name, n = "screen.svg", 1
    while (folder / name).exists():
        n += 1
        name = f"screen-{n}.svg"
    return name


class CollapseApp(App[dict[str, Any] | None]):
    """Watch and steer one self-training run."""

    CSS_PATH = "app.tcss"
    TITLE = "collapse-tui"
    ENABLE_COMMAND_PALETTE = False
    # Below 80 columns (a tmux split) the columns share the width and the footer is compact; from 110
    # the charts and the event log take more room, the log only where there are rows for it.
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-tiny"), (80, "-narrow"), (110, "-wide")]
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-short"), (30, "-tall")]
    #: How long a quit waits for the run to stop at a safe point before leaving anyway.
    QUIT_GRACE_S = 4.0
    #: How often a watcher whose run has ended looks for a resume that takes the run up again.
    RESUME_POLL_S = 1.0

    BINDINGS: ClassVar[list[Binding]] = [
        # Quit and help first, as harlequin's footer has them: a footer cut short by a narrow pane
        # loses its last keys, and these are the ones a newcomer must find.
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        # Two bindings on one key: check_action hides the one that does not apply.
        Binding("space,p", "pause", "Pause"),
        Binding("space,p", "resume", "Resume"),
        Binding("plus,equals_sign", "lr_up", "lr×2", key_display="+"),
        Binding("minus", "lr_down", "lr÷2", key_display="-"),
        Binding("l", "type_lr", "Set lr"),
        Binding("s", "snapshot", "Snapshot"),
        # History: one footer entry for all, to fit 80 columns; ? lists them. home/end are
        # priority bindings so the focused sample pane's own home/end (scroll) does not take them.
        Binding("left_square_bracket", "step(-1)", "History", key_display="[ ]"),
        Binding("right_square_bracket", "step(1)", "Next", show=False),
        Binding("left_curly_bracket", "step(-10)", "Back 10", show=False),
        Binding("right_curly_bracket", "step(10)", "Forward 10", show=False),
        Binding("home", "first", "First", show=False, priority=True),
        Binding("end", "follow", "Follow", show=False, priority=True),
        # Over SSH Ctrl-C is how a terminal program is left; here it quits as q does (twice: at once),
        # and the exit code says interrupted (130), as for kill -INT, if the run was still going.
        Binding("ctrl+c", "interrupt", "Quit", show=False, priority=True),
    ]

    def __init__(self, source: RunSource, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.source = source
        self.info = source.info
        self.clock = clock
        #: A watcher with ``--read-only`` may not steer the run: its steering keys are hidden.
        self.read_only = bool(getattr(source.controls, "read_only", False))
        self.summary: dict[str, Any] | None = None
        #: What the run raised, if anything; ``run_app`` re-raises it.
        self.run_error: BaseException | None = None
        #: What the screen itself raised (a bug in a widget or a handler), if anything: Textual
        #: ends the app on it, the run is stopped as on q, and ``run_app`` re-raises it.
        self.screen_error: Exception | None = None
        #: Set by the worker thread once ``source.run`` has returned or raised.
        self.run_done = threading.Event()
        self.loading = True
        self.running = False
        self.quitting = False
        self.collapsed = False
        #: The run has done its last iteration (max_iters, or a collapse that stops it) and is only
        #: saving and closing now: keys that steer it no longer apply.
        self.ending = False
        #: Whether the run has reported a pause (its ``pause`` event) and no resume since; the key
        #: only asks for one, which the run takes at the end of the iteration in flight.
        self.run_paused = False
        self.failed = False
        self.snapshot_pending = False
        #: The folder of the newest snapshot the run reported, where ``s`` puts the screen once it has ended.
        self.last_snapshot: str | None = None
        self.iteration: int | None = None
        #: Records drawn on the charts (a resume that goes back drops the abandoned ones).
        self.records_seen = 0
        #: (iteration, rep4, the charts' values: gen_loss, then the ``info.eval_names`` losses) of each
        #: record drawn, to redraw after such a resume: floats only, as the charts keep a bounded summary.
        self.drawn: list[tuple[int, float, tuple[float, ...]]] = []
        #: Past iterations' records, for the history keys; ``browsing`` is the one shown, None to follow.
        self.history = SampleHistory()
        self.browsing: Entry | None = None
        #: The run's process vanished without a summary (a watcher's FolderSource says so).
        self.process_gone = False
        #: The run's recent events, newest last (the log pane shows the same).
        self.events: deque[Event] = deque(maxlen=200)
        #: The lr of the last record or lr event, and one the UI asked for that the run has not applied yet.
        self.applied_lr = self.info.lr
        self.requested_lr: float | None = None
        #: When it was asked for (wall clock, as records' times).
        self.requested_since = 0.0
        #: (iteration, time) of recent records, for it/s.
        self.recent: deque[tuple[int, float]] = deque(maxlen=20)
        self.started_at = clock()
        #: When the run's thread ended: elapsed time stops there.
        self.ended_at: float | None = None
        #: The wall-clock time of the newest record or event, where a watched run's time ends if its
        #: process did not say (killed, or its machine went down): ``_elapsed``.
        self.last_seen_wall: float | None = None
        self._worker: Worker | None = None
        #: The charts, kept to tell cheaply (on every report) whether the screen is still there.
        self.charts: LossCharts | None = None
        #: Whether leaving printed ``WAITING_MESSAGE`` below the screen (``run_app`` then does not again).
        self.said_waiting = False
        #: Ctrl-C was pressed while the run went on (for the exit code, as a SIGINT would).
        self.interrupted = False
        #: The app's event loop once running, for signal handlers to reach it.
        self.loop: asyncio.AbstractEventLoop | None = None
        #: A stop signal came before the screen was up (``loop`` still None): ``on_mount`` acts on it.
        self.signalled_early = False
        #: A watcher's look, once its run has ended, for a resume that takes it up again; and whether
        #: it found one, which the screen now follows.
        self.looking_for_resume: Timer | None = None
        self.following_again = False

    # -- layout --------------------------------------------------------------

    def notify(self, message: str, *, markup: bool = False, **options: Any) -> None:
        """A notice, as plain text: its paths and error messages may hold brackets ("[enforce fail at …]",
        "[/]"), which Textual's markup would drop or raise on, taking the screen down."""
        super().notify(message, markup=markup, **options)

    def get_driver_class(self) -> type[Driver]:
        """Textual's driver for this terminal, made to survive the terminal hanging up."""
        return hangup_safe(super().get_driver_class())

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield LossCharts(self.info.eval_names, id="charts")
                yield RepetitionMeter(self.info.collapse_threshold, self.info.collapse_patience, id="meter")
            with Vertical(id="right"):
                with Vertical(id="loading"):
                    yield Label("starting…", id="loading-label")
                    yield ProgressBar(total=None, show_eta=False, id="loading-bar")
                yield SampleView(id="sample")
                yield EventLog(id="events")
        yield FittingFooter()

    def on_mount(self) -> None:
        self.charts = self.query_one(LossCharts)
        self.query_one("#charts").border_title = "loss"
        self.query_one("#meter").border_title = "repetition"
        self.query_one("#sample").border_title = "sample"
        self.query_one("#events").border_title = "events"
        self.query_one("#loading").border_title = "loading"
        self.loop = asyncio.get_running_loop()
        self.started_at = self.clock()
        self.running = True
        self._worker = self.run_worker(self._run, name="run", thread=True, exit_on_error=False)
        self.set_interval(1.0, self._show_status)
        self._show_status()
        if self.read_only:  # its steering keys are hidden and do nothing: say why once
            self.notify(
                "the keys that steer the run are off (watch without --read-only to steer)", title="read-only"
            )
        self._update_state()
        if self.signalled_early:  # a hang-up or kill while the screen started: leave once the run has
            self.stop_from_signal()

    @property
    def worker_started(self) -> bool:
        return self._worker is not None

    def on_unmount(self) -> None:
        # However the app ends (quit, SIGHUP, a crash), the run must stop so the process can exit.
        self.source.controls.stop()

    def _handle_exception(self, error: Exception) -> None:
        """Textual's hook for an exception the screen did not handle: kept for ``run_app``."""
        if self.screen_error is None:
            self.screen_error = error
            self.source.controls.stop("screen crashed")  # what the run's summary then gives as its reason
        super()._handle_exception(error)

    def _print_error_renderables(self) -> None:
        """Where Textual prints a crash's traceback on leaving; the CLI says it in one line instead.

        (Both hooks are Textual's own, private, methods: should a release rename
        them, a crash of the screen prints Textual's traceback again, and ``run_app``
        still ends it as a crash, by the app's return code.)
        """
        if self.screen_error is None:
            super()._print_error_renderables()
        else:
            self._exit_renderables.clear()

    # -- the run's thread ----------------------------------------------------

    def _run(self) -> dict[str, Any]:
        try:
            self.summary = self.source.run(AppListener(self))
            return self.summary
        except BaseException as error:
            self.run_error = error
            raise
        finally:
            self.run_done.set()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker is not self._worker or event.state in (WorkerState.PENDING, WorkerState.RUNNING):
            return
        self.running = False
        self.ended_at = self.clock()
        error = self.run_error
        if isinstance(error, UserError):
            self.exit(None)  # run_app re-raises it as one line
            return
        if error is not None and not self._logged(error):  # the run's error event may have said it already
            self.failed = True
            self._log(f"run failed: {type(error).__name__}: {error}")
            self.notify(
                brief(f"{type(error).__name__}: {error}"), title="run failed", severity="error", timeout=30
            )
        if self.loading and self.worker_started and self.following_again:
            # a resume followed that ended before it wrote anything: the run is as the screen showed it
            self.loading = False
            self._log("the resume ended before its first iteration; the run stands as it was")
        self._update_state()
        self._show_status()  # the rate and time left go now, not at the next tick
        if self.quitting:
            self.exit(self.summary)
        elif error is None and not self.runs_here and callable(getattr(self.source, "taken_up", None)):
            self.looking_for_resume = self.set_interval(self.RESUME_POLL_S, self._look_for_resume)

    def _look_for_resume(self) -> None:
        """A watcher of an ended run: follow on once a ``--resume`` takes the run up again (whether
        started after this screen showed the end, or in the moment before it announced itself)."""
        if self.running or not (self.quitting or self.source.taken_up()):  # type: ignore[attr-defined]
            return
        if self.looking_for_resume is not None:
            self.looking_for_resume.stop()
            self.looking_for_resume = None
        if self.quitting:
            return
        self.summary, self.ended_at = None, None
        self.process_gone = self.failed = self.ending = False
        self.run_done.clear()
        self.recent.clear()  # no rate, nor time left, from the run before until the resume's own records
        self.snapshot_pending, self.requested_lr = False, None  # asked of the run before: never read
        self.following_again = True
        self.loading = True  # until the resume's first event: its model is loading
        self.running = True
        self._log("the run was taken up again (a resume): following it")
        self._worker = self.run_worker(self._run, name="run", thread=True, exit_on_error=False)
        self._update_state()
        self._show_status()

    # -- reports from the run ------------------------------------------------

    def on_status_report(self, report: StatusReport) -> None:
        if not self.loading:  # the loading pane is gone: the meter says it, until the snapshot's event
            self.query_one(RepetitionMeter).set_note(report.text)
            return
        self.query_one("#loading-label", Label).update(Text(report.text))  # a path may hold brackets
        bar = self.query_one("#loading-bar", ProgressBar)
        if report.fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=1.0, progress=max(0.0, min(1.0, report.fraction)))

    @property
    def screen_gone(self) -> bool:
        """Whether an exit has torn the main screen down: reports still in the queue then draw nothing."""
        # is_running goes False as the shutdown begins, before the widgets are removed one by one
        return not self.is_running or self.charts is None or not self.charts.is_attached

    def on_record_report(self, report: RecordReport) -> None:
        if self.screen_gone:
            return
        record = report.record
        self._loaded()
        if self.drawn and record.iteration <= self.drawn[-1][0]:
            self._rewind(record.iteration)
        self._remember(record)
        self._lr_applied(record.lr)
        if self.requested_lr is not None and began_after_read(record, self.requested_since):
            # an iteration begun after the run read the request shows another lr: another watcher asked
            # at the same boundary, and the run applied the last one asked for
            self.requested_lr = None
        self.recent.append((record.iteration, record.time))
        self.last_seen_wall = max(self.last_seen_wall or 0.0, record.time)
        if record.iteration + 1 >= self.info.max_iters:
            self.ending = True
        self.query_one(LossCharts).add(record.gen_loss, record.valid)
        self.query_one(RepetitionMeter).update_metrics(
            record.rep4, record.distinct1, record.unique_tokens, record.compression_ratio
        )
        self._show_sample()
        self._show_status()
        if self.records_seen == 1 or self.ending:  # the history keys now apply; the last record ends the run
            self._update_state()

    def _lr_applied(self, lr: float) -> None:
        """The run runs at ``lr`` now (a record, an lr event, a resume): an lr asked for is settled by it."""
        self.applied_lr = lr
        if self.requested_lr == lr:
            self.requested_lr = None

    def _remember(self, record: IterationRecord) -> None:
        """Keep ``record`` for stepping back to and for redrawing the charts."""
        self.history.add(self.records_seen, record)
        self.records_seen += 1
        losses = tuple(record.valid.get(name, math.nan) for name in self.info.eval_names)
        self.drawn.append((record.iteration, record.rep4, (record.gen_loss, *losses)))
        self.iteration = record.iteration

    def _redraw(self) -> None:
        """The charts and the meter's history drawn again from ``drawn``."""
        self.query_one(LossCharts).replace(values for *_, values in self.drawn)
        self.query_one(RepetitionMeter).replay(rep4 for _, rep4, _ in self.drawn)

    def _drawn_before(self, resume: Event) -> bool:
        """Whether the last record drawn was written before ``resume``, by the run's clock: the old
        branch's, which it abandons, and not the new branch's."""
        return self.history.last is None or self.history[self.history.last].record.time < resume.time

    def _rewind(self, iteration: int) -> None:
        """Forget the records from ``iteration`` on: a run resumed from an earlier snapshot abandoned
        them (its ``resumed_from`` event says so, or the new branch's first record, a record not past
        the last one: ``runfolder.dedupe_records``), and a watcher that saw them must not draw after them."""
        keep = bisect_left([row[0] for row in self.drawn], iteration)
        del self.drawn[keep:]
        self.history.forget_from(iteration)
        self.records_seen = keep
        self.recent.clear()
        self._redraw()
        if self.browsing is not None and self.browsing.record.iteration >= iteration:
            self._browse(None)  # an abandoned iteration: its ordinal now belongs to the new branch

    def on_event_report(self, report: EventReport) -> None:
        if self.screen_gone:
            return
        event = report.event
        kind = event.event
        if kind == "resumed_from" and not self.drawn and self.runs_here:
            self._show_earlier(event)
        if event.event != "process_gone":  # a watcher's own note, made when it noticed
            self.last_seen_wall = max(self.last_seen_wall or 0.0, event.time)
        self._log_event(event)
        if kind in ("start", "resumed_from"):
            self._loaded()
        if kind == "resumed_from":  # what the abandoned iterations showed no longer holds
            if self.drawn and self.drawn[-1][0] >= event.iteration and self._drawn_before(event):
                self._rewind(event.iteration)  # a watcher that drew them
            self.recent.clear()  # nor does a rate across the time the run was not running
            self.failed = False
            self.ending = False
            self.run_paused = False
            self.collapsed = event.data.get("collapsed_at") is not None
            # the resume's own: a watcher opened before it read the run before's, and the snapshot's lr
            # is what + and - work from (a key may have changed it since the run's config.json)
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self.info.max_iters = int(event.data["max_iters"])
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self._lr_applied(float(event.data["lr"]))
        elif kind == "pause":
            self.run_paused = True
        elif kind in ("start", "stop"):  # a run stopped while paused is not paused when it goes on
            self.run_paused = False
        elif kind == "resume":
            self.run_paused = False
            self.recent.clear()  # it/s and the time left from records after the pause only
        elif kind == "lr":
            with contextlib.suppress(TypeError, ValueError):  # a hand-edited line: the next record says
                self._lr_applied(float(event.data.get("lr", self.applied_lr)))
        elif kind == "snapshot":
            self.query_one(RepetitionMeter).set_note("")  # the "saving snapshot" status is over
            self.last_snapshot = self._in_run_folder(event.data.get("path")) or self.last_snapshot
            # Only for a snapshot this screen asked for: a watcher replaying a run's history
            # must not write its screen into an old snapshot.
            if self.snapshot_pending:
                self.snapshot_pending = False
                self._save_screen(self._in_run_folder(event.data.get("path")))
        elif kind == "snapshot_failed":
            self.query_one(RepetitionMeter).set_note("")
            if self.snapshot_pending or event.data.get("final"):  # final: a watcher learns the end has none
                self.snapshot_pending = False
                self.notify(str(event.data.get("message", "")), title="snapshot failed", severity="error")
        elif kind == "collapse":
            self.collapsed = True
            self.ending = self.ending or not self.info.keep_going
            tail = "it goes on (keep-going)" if self.info.keep_going else "the run stops; q quits"
            if self._news(event):
                rep4 = event.data.get("rep4")
                # a hand-edited event line may hold anything: the notice then leaves the number out
                level = f"rep4 {format_rep4(rep4)}: " if isinstance(rep4, int | float) else ""
                self.notify(level + tail, title="collapsed", severity="warning")
        elif kind == "error":
            self.failed = True
            if self._news(event):
                message = str(event.data.get("message", ""))
                self.notify(brief(message), title="run error", severity="error", timeout=30)
        elif kind == "process_gone":
            self.process_gone = True
            message = str(event.data.get("message", "it ended without writing a summary"))
            self.notify(brief(message), title="the run's process is gone", severity="error", timeout=30)
        self._update_state()
        self._show_status()

    def _news(self, event: Event) -> bool:
        """Whether ``event`` happened while this screen was open: what a watcher replays (a collapse
        hours ago) goes into the log and the state, not into a notice as if it were happening now.

        Told by the run's own clock (``RunInfo.history_until``), never this host's against the
        run's: a watcher over a shared folder may run on a host whose clock is hours apart.
        """
        history_until = self.info.history_until
        return history_until is None or event.time > history_until

    def _log_event(self, event: Event) -> None:
        """Keep ``event`` and put its line in the event pane."""
        self.events.append(event)
        self._log(self._short_paths(event.describe()))

    def _short_paths(self, line: str) -> str:
        """Snapshot paths inside the run folder, short enough for a narrow pane.

        Runs write absolute paths; a watcher may have been given the folder
        relative. Only a path that starts with the folder is shortened, not
        one that holds its name ("run/" in ".../myrun/").
        """
        if self.info.run_dir:
            for folder in (os.path.abspath(self.info.run_dir), str(Path(self.info.run_dir))):
                line = re.sub(rf"(?<!\S){re.escape(folder + os.sep)}", "", line)
        return line

    @property
    def runs_here(self) -> bool:
        """Whether the run is this process's own (a watcher's source replays its folder by itself)."""
        return self.source.controls.stops_the_run

    def _show_earlier(self, resumed: Event) -> None:
        """Draw what the run did before this resume, from its folder, as a watcher of it would see it.

        The engine in this process reports only the iterations it runs; the
        curves a researcher resumes a run to see go on come from metrics.jsonl
        and events.jsonl, read once here.
        """
        if not self.info.run_dir or resumed.iteration <= 0:
            return
        try:
            run = read_run(Path(self.info.run_dir))
        except UserError:
            return
        # the events in the file's order (clocks of the hosts a run was resumed on need not agree),
        # without what this resume abandons: its own resumed_from is not in the file yet (the engine
        # holds it there until its first record)
        for event in drop_abandoned_events([*run.events, resumed])[:-1]:
            self._log_event(event)
        earlier = [record for record in run.records if record.iteration < resumed.iteration]
        for record in earlier:
            self._remember(record)
        if earlier:
            last = earlier[-1]
            self._redraw()
            self.query_one(RepetitionMeter).show_metrics(  # counted by _redraw's replay already
                last.rep4, last.distinct1, last.unique_tokens, last.compression_ratio
            )
            self._show_sample()

    def _logged(self, error: BaseException) -> bool:
        """Whether an error event of the run already carries ``error``'s message."""
        return any(
            event.event == "error" and str(error) in str(event.data.get("message", ""))
            for event in self.events
        )

    def _loaded(self) -> None:
        if self.loading:
            self.loading = False
            self.query_one("#loading").display = False

    def _in_run_folder(self, path: Any) -> str | None:
        """A snapshot an event names, found in the run folder shown here.

        The event holds the path as the run's process spelled it: relative to
        that process's working folder, or in the folder a copied or moved run
        was written to. The snapshot's own name is what holds.
        """
        if not path:
            return None
        if not self.info.run_dir:
            return str(path)
        return str(Path(self.info.run_dir) / SNAPSHOTS / Path(str(path)).name)

    def _save_screen(self, path: Any, *, screen_only: bool = False) -> None:
        """The screen as SVG beside the engine's snapshot, so the moment can be seen again later.

        The notices are left out of it: they sit over the charts, and the one that said the
        snapshot was requested is stale by now. They are hidden for the one frame the SVG is
        drawn from, and shown again after.
        """
        if not path:
            return
        racks = [rack for rack in self.screen.query(f"#{TOAST_RACK_ID}") if rack.display]
        for rack in racks:
            rack.display = False
        self.call_after_refresh(self._write_screen, Path(path), racks, screen_only)

    #: Refreshes to wait at most for hidden notices to leave the screen's layout before saving it anyway.
    SAVE_WAITS = 20

    def _write_screen(
        self, folder: Path, racks: list[Widget], screen_only: bool, waits: int = SAVE_WAITS
    ) -> None:
        # a refresh may come before the layout that drops the hidden notices: then wait for another
        if waits and any(self._laid_out(widget) for rack in racks for widget in (rack, *rack.query("*"))):
            self.call_after_refresh(self._write_screen, folder, racks, screen_only, waits - 1)
            return
        try:
            name = free_screen_name(folder)
            write_atomic(folder / name, self.export_screenshot())  # whole or not at all (a full disk)
        except OSError as error:
            self.notify(f"could not save the screen: {error}", severity="error")
            return
        finally:
            for rack in racks:
                rack.display = True
        what = f"the screen saved as {name}" if screen_only else f"model, optimizer and {name} saved"
        self.notify(f"{what} in {folder}", title="snapshot")

    def _laid_out(self, widget: Widget) -> bool:
        """Whether ``widget`` is still in the screen's layout (and so in a screenshot of it)."""
        try:
            self.screen.find_widget(widget)
        except NoWidget:
            return False
        return True

    # -- drawing -------------------------------------------------------------

    @property
    def state(self) -> str:
        """loading, running, pausing, paused, stopping, finishing, collapsed, finished, stopped, error or process gone.

        "pausing" is a pause asked for that the run has not reached yet (it
        finishes the iteration in flight first); a run that goes on after a
        collapse (``--keep-going``) shows its pause too. "finishing" is a run
        past its last iteration that is still saving its final snapshot.
        """
        if self.failed:
            return "error"
        if self.process_gone:
            return "process gone"
        if self.quitting and self.running and self.runs_here:  # a watcher leaving stops nothing
            return "stopping"
        if self.loading and self.running:
            return "loading"
        if self.running and self.ending:
            return "collapsed" if self.collapsed else "finishing"
        if self.running and self.source.controls.paused:
            return "paused" if self.run_paused else "pausing"
        if self.collapsed:
            return "collapsed"
        if not self.running:
            # stopped early (q, a signal) is not finished; a watcher learns it from the summary
            # (a non-finite loss has its error event: "error" above)
            # ("running": a watcher's source detached as it left, the run going on)
            ended = {"stopped": "stopped", "crashed": "error", "running": "running"}
            return ended.get(str((self.summary or {}).get("status")), "finished")
        return "running"

    @property
    def current_lr(self) -> float:
        """The lr the next iteration will use, as far as the UI knows: what + and - work from."""
        return self.requested_lr if self.requested_lr is not None else self.applied_lr

    def _update_state(self) -> None:
        if self.screen_gone:
            return
        self.query_one(RepetitionMeter).set_state(self.state)
        self.refresh_bindings()

    def _rate(self) -> float | None:
        """Iterations per second over the recent records, by the records' own clocks."""
        if len(self.recent) < 2:
            return None
        (first_it, first_t), (last_it, last_t) = self.recent[0], self.recent[-1]
        return (last_it - first_it) / (last_t - first_t) if last_t > first_t else None

    def _show_status(self) -> None:
        """Once a second: the status line. A tick that comes while the app tears its screen down does nothing."""
        lines = self.query(StatusLine)
        if not lines:
            return
        # rates from before a pause say nothing now, nor once the run has ended
        rate = None if self.run_paused or not self.running else self._rate()
        done = 0 if self.iteration is None else self.iteration + 1
        remaining = (self.info.max_iters - done) / rate if rate and self.running else None
        lines.first().show(
            model=self.info.model,
            device=self.info.device,
            iteration=self.iteration,
            max_iters=self.info.max_iters,
            rate=rate,
            lr=self.applied_lr,
            pending_lr=self.requested_lr,
            elapsed=self._elapsed(),
            remaining=remaining,
        )

    def _elapsed(self) -> float | None:
        """Seconds the run has run: since this screen started it, or for a watcher since the run's
        process started (to its end, for a finished run), by the times in its ``process.json``;
        None for a watcher of a run with no such file (a copied folder, a run of an old version):
        the time it has watched is not the run's."""
        started = self.info.process_started
        if started is None:
            if not self.runs_here:
                return None
            return (self.ended_at if self.ended_at is not None else self.clock()) - self.started_at
        ended = self.info.process_ended
        if ended is None:  # still going, or gone without a word: then its last line is its end
            ended = time.time() if self.running or self.last_seen_wall is None else self.last_seen_wall
        return max(0.0, ended - started)

    def _show_sample(self) -> None:
        """The sample pane and the charts' marker: the latest record, or the one being browsed."""
        latest = self.history.last
        if self.browsing is not None:
            record = self.browsing.record  # kept here: the history may thin it out meanwhile
            self.query_one(SampleView).show(record.iteration, record.text, latest=latest, rep4=record.rep4)
        elif latest is not None:
            record = self.history[latest].record
            self.query_one(SampleView).show(record.iteration, record.text)

    @property
    def shown_iteration(self) -> int | None:
        """The iteration whose sample is on screen: the browsed one, else the latest."""
        return self.browsing.record.iteration if self.browsing is not None else self.history.last

    def _browse(self, iteration: int | None) -> None:
        """Show the sample of ``iteration`` and mark it on the charts; None follows the latest again."""
        entry = None if iteration is None or iteration == self.history.last else self.history.get(iteration)
        self.browsing = entry  # the latest one is what following shows
        self.query_one(LossCharts).mark(None if entry is None else entry.ordinal)
        self._show_sample()
        self.refresh_bindings()

    def _log(self, line: str) -> None:
        if not self.screen_gone:
            self.query_one(EventLog).add(line)

    # -- keys ----------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide the pause/resume key that does not apply; grey out what the run cannot take now."""
        if self.screen.is_modal:  # help or a dialog is open: only its own keys work, and quitting
            # but not q where it is typed into the lr dialog's field: the footer must not offer it
            return action == "interrupt" or (action == "quit" and not isinstance(self.screen, LrScreen))
        if self.read_only and action in STEERING_ACTIONS:
            return False
        if action in HISTORY_ACTIONS:
            by = parameters[0] if action == "step" and parameters else 0
            if action == "follow" or (isinstance(by, int) and by > 0):
                return True if self.browsing is not None else None
            return True if len(self.history) else None
        live = self.live
        paused = self.source.controls.paused
        # a run of this process may be paused while it loads: it then waits before its first iteration
        pausable = live or (self.loading and self.running and not self.quitting and self.runs_here)
        if action == "pause":
            return False if paused else (True if pausable else None)
        if action == "resume":
            return (True if pausable else None) if paused else False
        if action in ("lr_up", "lr_down", "type_lr"):
            return True if live else None
        if action == "snapshot":
            if self.ended_here:  # the screen alone, beside the run's last snapshot
                return True
            return True if live and not self.snapshot_pending else None
        return True

    @property
    def live(self) -> bool:
        """Whether the run can still take a steering command: loaded, not ending and not quitting."""
        return self.running and not self.quitting and not self.loading and not self.ending

    def _steer(self, command: Callable[[], None]) -> bool:
        """Send a steering command; one refused (a bad value, or a watcher's that cannot be written to a
        full disk) is a notice, not a crash."""
        try:
            command()
        except (UserError, ValueError) as error:
            self.notify(str(error), severity="error")
            return False
        return True

    def action_pause(self) -> None:
        if self._steer(self.source.controls.pause) and self.loading:
            self.notify("the run will wait before its first iteration", title="pause")
        self._update_state()

    def action_resume(self) -> None:
        self._steer(self.source.controls.resume)
        self._update_state()

    def action_lr_up(self) -> None:
        doubled = self.current_lr * 2
        if doubled > MAX_LR and self.current_lr < MAX_LR:  # + stops at the ceiling, as l does
            doubled = MAX_LR
            self.notify(
                f"lr stops at {MAX_LR:g}: above it the update only wrecks the model", severity="warning"
            )
        self._request_lr(doubled)

    def action_lr_down(self) -> None:
        self._request_lr(self.current_lr / 2)

    def action_type_lr(self) -> None:
        def apply(value: float | None) -> None:
            if value is not None:
                self._request_lr(value)

        self.push_screen(LrScreen(self.current_lr, running=self.applied_lr), apply)

    def _request_lr(self, lr: float) -> None:
        if not self.live:  # the l dialog can outlive the run's last iteration
            self.notify("the run has ended: the learning rate stays as it was", severity="warning")
            return
        if lr > MAX_LR and lr > self.current_lr:  # the l dialog's ceiling holds for + too (not for -)
            self.notify(f"lr {lr:.3g}: above {MAX_LR:g} the update only wrecks the model", severity="error")
            return
        if not self._steer(lambda: self.source.controls.set_lr(lr)):
            return
        # The engine logs no event for a "change" to the lr it already has: nothing to wait for then.
        self.requested_lr = None if lr == self.applied_lr else lr
        self.requested_since = time.time()
        self._show_status()

    @property
    def ended_here(self) -> bool:
        """Whether the run has ended while this screen watched it, with a folder to keep a screenshot in."""
        return not self.running and self.worker_started and bool(self.info.run_dir) and not self.read_only

    def action_snapshot(self) -> None:
        if self.ended_here:  # no model to save any more: keep the screen, as the end of the run looks
            # into its last snapshot, or the run's folder where that is gone (a disk cleaned up)
            last = self.last_snapshot if self.last_snapshot and Path(self.last_snapshot).is_dir() else None
            self._save_screen(last or self.info.run_dir, screen_only=True)
            return
        if not self._steer(self.source.controls.request_snapshot):
            return
        self.snapshot_pending = True
        self.refresh_bindings()
        # a paused engine takes it at once, at the boundary it waits on
        when = "now (the run is paused)" if self.run_paused else "after the iteration in flight"
        self.notify(f"saved {when}", title="snapshot requested")

    def action_step(self, by: int) -> None:
        """Move ``by`` iterations back (negative) or forward through the samples; past the latest, follow."""
        shown = self.shown_iteration
        if shown is None:
            return
        target = self.history.before(shown, -by) if by < 0 else self.history.after(shown, by)
        self._browse(target)

    def action_first(self) -> None:
        self._browse(self.history.first)

    def action_follow(self) -> None:
        self._browse(None)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            ended = self.worker_started and not self.running
            keys = help_keys(stops_the_run=self.runs_here, read_only=self.read_only, ended=ended)
            self.push_screen(HelpScreen(keys))

    async def action_quit(self) -> None:
        """Stop the run at its next safe point, then leave; a second q (or a stuck run) leaves at once."""
        self.source.controls.stop()
        if not self.running or self.quitting:
            self._leave()
            return
        self.quitting = True
        self._update_state()
        self._log("stopping…" if self.runs_here else "leaving; the run goes on")
        self.set_timer(self.QUIT_GRACE_S, self._leave)

    async def action_interrupt(self) -> None:
        """Ctrl-C: quit as q does; a run it stops early ends the process with exit code 130."""
        if not self.run_done.is_set():
            self.interrupted = True
        self.source.controls.stop("SIGINT")  # as kill -INT: the key is the signal in the screen's raw mode
        await self.action_quit()

    def _leave(self) -> None:
        """Leave the screen; if the run is still stopping, say so below it, as the process waits for it.

        The process cannot end before the run's thread does (it may be saving
        a large model's final snapshot); without a line the terminal would
        look hung.
        """
        if self.run_done.is_set():
            self.exit(self.summary)
        else:
            self.said_waiting = True
            self.exit(self.summary, message=Text(WAITING_MESSAGE))

    def stop_from_signal(self) -> None:
        """For a hang-up, kill or kill -INT: stop the run and leave, keeping everything the run wrote."""
        self.source.controls.stop()
        self.quitting = True
        if not self.running:
            self.exit(self.summary)


def need_terminal(instead: str) -> None:
    """Refuse, before anything is made, a screen that no one could see: Textual draws on stderr and
    reads keys from stdin, so both must be a terminal (else escape codes go into a file, and the
    screen waits for ever for a q no one can type). ``instead``: what to run instead."""
    if not all(stream is not None and stream.isatty() for stream in (sys.__stdin__, sys.__stderr__)):
        raise UserError(
            f"the live screen needs a terminal, and this process's input or error output is not one; {instead}"
        )


def run_app(
    source: RunSource, *, clock: Callable[[], float] = time.monotonic, headless: bool = False
) -> dict[str, Any]:
    """Run the TUI on ``source`` until the user quits; return the run's summary.

    Returns only once the run's thread has finished, so the run folder's
    summary is written. A hang-up (SSH dropped), ``kill`` (SIGTERM) or
    ``kill -INT`` stops the run cleanly instead of killing it, as q does; the
    summary returned then names the signal (``"signal"``), for the exit code.
    A ``UserError`` the run raised (a model that is not there) is re-raised
    here, after the screen is restored, for the CLI to print. ``headless``
    runs without a terminal (for tests).
    """
    app = CollapseApp(source, clock=clock)
    signals: list[str] = []  # every stop signal received
    stopped_by: list[str] = []  # those that stopped a run still going

    hangup = getattr(signal, "SIGHUP", None)
    hung_up: list[bool] = []

    def on_signal(signum: int, frame: Any) -> None:
        if ignore_later_hangups(signum):
            hung_up.append(True)
            if terminal_gone():
                silence_output()  # nothing written to a dead terminal may fail or block the exit
        if signals and changes_nothing_once_stopping(signum):
            return  # a hang-up or a SIGTERM after a q-like signal: the stop is under way
        if signals:  # a second one: leave now, as a second q does (snapshots are written atomically)
            for number, handler in previous.items():
                signal.signal(number, signal.SIG_DFL if number == signum else handler)
            # the signal's own action skips Textual's way out; after the line above, so that a third
            # one still ends the process should the terminal stall the writing
            restore_terminal(getattr(app, "_driver", None))
            os.kill(os.getpid(), signum)
            return
        signals.append(signal.Signals(signum).name)
        if not app.run_done.is_set():
            stopped_by.append(signals[0])
        source.controls.stop(signals[0])
        if app.loop is not None:
            app.loop.call_soon_threadsafe(app.stop_from_signal)
        else:  # the screen is not up yet: it leaves as soon as it is (or it would wait for a q)
            app.signalled_early = True

    previous: dict[int, Any] = {}
    for name in STOP_SIGNAL_NAMES:
        if hasattr(signal, name):
            number = getattr(signal, name)
            previous[number] = signal.signal(number, on_signal)
    pass_on_early_interrupt()
    try:
        app.run(headless=headless)
    finally:
        source.controls.stop()
        # app.run returns once the run's thread has (asyncio.run waits for it), except where
        # that wait has a limit (Python 3.12+: 5 minutes); then wait on, having said so once
        if app.worker_started and not app.run_done.wait(2.0):
            if not app.said_waiting:
                print(WAITING_MESSAGE, file=sys.stderr)
            app.run_done.wait()
        for number, handler in previous.items():
            # after a hang-up the kernel's may still be on its way: it stays ignored, so that it cannot
            # end the process before the CLI has marked the run folder's process ended
            if not (number == hangup and hung_up):
                signal.signal(number, handler)
        if terminal_gone():  # the lines the CLI prints after the screen would fail (EIO)
            silence_output()
    if app.run_error is not None:
        raise app.run_error
    if app.screen_error is not None:  # the run is stopped and its folder complete; the screen crashed
        raise ScreenCrashed(app.screen_error) from app.screen_error
    if app.return_code:  # a failure Textual reported only by its code (had its hooks been renamed)
        raise ScreenCrashed(RuntimeError(f"the screen ended with code {app.return_code}"))
    summary = app.summary or {}
    if not stopped_by and app.interrupted:  # the interrupt key, which the screen's raw mode keeps a key
        stopped_by.append("SIGINT")
    return {**summary, "signal": stopped_by[0]} if stopped_by else summary
