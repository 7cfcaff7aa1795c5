"""``collapse-tui headless``: the run with no UI.

On a terminal, a rich progress bar (iteration, it/s, ETA, then rep4 and the last losses);
otherwise (a log file, nohup, CI) one plain line per iteration. Ctrl-C, a
SIGTERM or a hang-up (unless nohup ignores it) stop the run at the next safe
point (a generation in progress is cut short and its iteration discarded),
write the summary and a stop event, and exit 130. This module
must never import textual.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from collapse_tui.config import RunConfig
from collapse_tui.crash import report_crash
from collapse_tui.engine import Engine
from collapse_tui.errors import UserError
from collapse_tui.exits import (
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    STOP_SIGNAL_NAMES,
    changes_nothing_once_stopping,
    closing_line,
    ignore_later_hangups,
    pass_on_early_interrupt,
    run_exit_code,
    unchanged_line,
)
from collapse_tui.follow import serving_watchers
from collapse_tui.metrics import format_rate, format_rep4
from collapse_tui.records import Event, IterationRecord, phase_seconds
from collapse_tui.tables import print_table, stop_writing_stdout


def format_losses(record: IterationRecord) -> str:
    """rep4 first: on a narrow terminal the progress bar cuts this text off at its end."""
    valid = "  ".join(f"{name} {loss:.3f}" for name, loss in record.valid.items())
    return f"rep4 {format_rep4(record.rep4)}  gen_loss {record.gen_loss:.3f}  {valid}"


class PlainReporter:
    """One line per iteration and per event, for logs and pipes.

    Output that can no longer be written (a closed pipe, a terminal gone
    with its SSH session: EPIPE, EIO) stops the reporting, never the run:
    everything is in the run folder anyway.
    """

    def __init__(self, engine: Engine, stream: Any = None) -> None:
        self.engine = engine
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        #: Set once output failed; from then on nothing is written.
        self.lost = False

    def guarded(self, write: Callable[[], object]) -> None:
        """Run ``write``; if the output is gone, give up on it (``lost``) instead of raising."""
        if self.lost:
            return
        try:
            write()
        except OSError:
            self.lost = True
            self._lose()

    def _lose(self) -> None:
        """Release what writes to the lost output (the progress bar's refresh)."""

    def _print(self, line: str) -> None:
        self.guarded(lambda: print(line, file=self.stream, flush=True))

    def on_status(self, message: str, fraction: float | None = None) -> None:
        self._print(f"[{message}]")

    def on_record(self, record: IterationRecord) -> None:
        seconds = phase_seconds(record)
        self._print(
            f"it {record.iteration + 1}/{self.engine.config.max_iters}  {format_losses(record)}"
            f"  lr {record.lr:.3g}  {seconds:.2f}s"
        )

    def on_event(self, event: Event) -> None:
        # a user's mistake is printed once, as the command's one error line, not here as well
        if event.event != "start" and not event.data.get("user_error"):
            self._print(f"[{event.describe()}]")

    def close(self) -> None:
        pass


#: The progress bar's width in columns: narrow, so that an 80-column line keeps room for the losses.
BAR_WIDTH = 12


class ProgressReporter(PlainReporter):
    """A live rich progress bar on a terminal, events printed above it."""

    def __init__(self, engine: Engine, console: Console) -> None:
        super().__init__(engine)
        self.console = console

        # the count, rate and time left keep their width; the losses take what is left of the line,
        # cut short with an ellipsis (at 80 columns they would otherwise squeeze the rest to "4/…")
        def whole() -> Column:
            return Column(no_wrap=True)

        self.progress = Progress(
            TextColumn("[bold]it", table_column=whole()),
            MofNCompleteColumn(table_column=whole()),
            BarColumn(bar_width=BAR_WIDTH, table_column=whole()),
            TextColumn("{task.fields[rate]}", markup=False, table_column=whole()),
            TimeRemainingColumn(table_column=whole()),
            # markup off: set names and paths may hold brackets
            TextColumn(
                "{task.fields[losses]}",
                markup=False,
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1, min_width=len("rep4 0.000")),
            ),
            console=console,
            transient=False,
            expand=True,
        )
        self.task = self.progress.add_task(
            "run", total=engine.config.max_iters, rate="", losses="loading…", start=False
        )
        self.progress.start()
        self.times: list[float] = []
        #: What the bar shows beside the count once a status message (a snapshot saving) has passed.
        self.losses = ""

    def on_status(self, message: str, fraction: float | None = None) -> None:
        self.guarded(lambda: self.progress.update(self.task, losses=message))

    def on_record(self, record: IterationRecord) -> None:
        self.guarded(lambda: self._show_record(record))

    def _show_record(self, record: IterationRecord) -> None:
        now = time.monotonic()
        self.times = [*self.times[-19:], now]
        rate = (len(self.times) - 1) / (self.times[-1] - self.times[0]) if len(self.times) > 1 else 0.0
        if not self.progress.tasks[0].started:
            self.progress.start_task(self.task)
        self.losses = format_losses(record)
        self.progress.update(
            self.task,
            completed=record.iteration + 1,
            rate=format_rate(rate) if rate else "",
            losses=self.losses,
        )

    def on_event(self, event: Event) -> None:
        if event.event == "start":
            self.guarded(lambda: self.progress.update(self.task, completed=event.iteration))
            self.guarded(lambda: self.progress.start_task(self.task))
        elif not event.data.get("user_error"):  # not markup: messages hold brackets
            self.guarded(lambda: self.console.print(Text(event.describe(), style="dim")))
            if event.event in ("snapshot", "snapshot_failed") and self.losses:
                # the "saving snapshot" status is over: the bar's last frame shows the losses again
                self.guarded(lambda: self.progress.update(self.task, losses=self.losses))

    def _lose(self) -> None:
        with contextlib.suppress(Exception):
            self.progress.stop()

    def close(self) -> None:
        self.guarded(self.progress.stop)


def summary_table(summary: dict[str, Any]) -> Table:
    """The table printed when a run ends: how far it got and how the losses moved."""
    table = Table(title="collapse-tui run", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # a path a resume takes is kept whole, over lines if need be
    first, last = summary.get("first") or {}, summary.get("last") or {}

    def add_row(name: str, value: str) -> None:  # as text, not markup: paths and messages hold brackets
        table.add_row(Text(name), Text(value))

    def rep4_cell(value: Any) -> str:
        return format_rep4(value) if isinstance(value, float) else str(value)

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)

    status, reason = summary["status"], summary["reason"]
    add_row("status", status if reason == status else f"{status} ({reason})")
    add_row("iterations run", str(summary["iterations"]))
    collapsed = summary.get("collapsed_at")
    add_row("collapsed at", "—" if collapsed is None else f"iteration {collapsed}")
    if first:
        add_row("gen_loss first → last", f"{fmt(first['gen_loss'])} → {fmt(last['gen_loss'])}")
        for name, value in first["valid"].items():
            add_row(f"{name} first → last", f"{fmt(value)} → {fmt(last['valid'].get(name))}")
        add_row("rep4 first → last", f"{rep4_cell(first['rep4'])} → {rep4_cell(last['rep4'])}")
    if summary.get("final_snapshot_failed"):
        add_row("final snapshot", f"failed: {summary['final_snapshot_failed']}")
    if "last_snapshot" in summary:  # runs written before it was kept have no such key
        add_row("last snapshot", summary["last_snapshot"] or "—")
    add_row("run folder", summary["run_dir"])
    return table


def run_headless(config: RunConfig, *, resume_lr: float | None = None) -> int:
    """Run to the end in this thread; return the process exit code."""
    engine = Engine(config, resume_lr=resume_lr)
    console = Console(stderr=False)
    reporter: PlainReporter | None = None
    interrupted = False
    leaving = False  # a KeyboardInterrupt is on its way out: the cleanup it runs must not get another

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted, leaving
        ignore_later_hangups(signum)
        if leaving or (interrupted and changes_nothing_once_stopping(signum)):
            return  # a hang-up or a SIGTERM after the stop began; anything once leaving
        if interrupted or not engine.loaded:
            interrupted = leaving = True
            # a Ctrl-C now ends the process outright, should this exit stall (or its interrupt be lost)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt  # a second Ctrl-C, or still loading: leave now
        interrupted = True
        engine.controls.stop(signal.Signals(signum).name)

    summary: dict[str, Any] | None = None
    crash: Exception | None = None
    try:
        # entered right after the Engine: whatever fails from here on removes the default-named
        # folder it made, if no run got as far as using it
        with serving_watchers(
            engine.run_dir,
            engine.controls,
            made=engine.made_dirs,
            left_as_it_stood=lambda: engine.left_as_it_stood,
        ):
            _catch_stop_signals(stop)
            reporter = ProgressReporter(engine, console) if console.is_terminal else PlainReporter(engine)
            summary = engine.run(reporter)
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: leave now (summary stays None)
    except UserError:
        raise
    except Exception as error:  # a crash, not a mistake: one line, the traceback kept in a file
        crash = error
    finally:
        if reporter is not None:
            reporter.close()
            if reporter.lost:  # nothing more can reach it, not even Python's last flush at exit
                stop_writing_stdout()
        if summary is not None and reporter is not None:  # the run's outcome is settled, its exit code too
            code = run_exit_code(summary, signalled=interrupted)
            _leave_at_once_with(code, stopping=interrupted)
        else:
            _reset_stop_signals(stopping=interrupted)
    if crash is not None:
        report_crash(crash, engine.run_dir, go_on_from=engine.go_on_from)
        return EXIT_RUN_FAILED
    if summary is None or reporter is None:
        if engine.unchanged:  # its snapshot is the one it resumed from: not one to go on from
            _say(unchanged_line(engine.run_dir))
            return EXIT_INTERRUPTED
        run_dir = engine.run_dir if engine.loaded else None
        _say(interrupted_line(run_dir, engine.last_snapshot, at_the_end=engine.end_saved))
        return EXIT_INTERRUPTED
    if not summary.get("unchanged"):  # else the folder's own summary stands, not this process's
        table = summary_table(summary)
        reporter.guarded(lambda: print_table(console, table))
    line = closing_line(summary)
    if line:
        _say(line)
    return code


def interrupted_line(run_dir: Path | None, last_snapshot: Path | None, *, at_the_end: bool = False) -> str:
    """The one line for a run left at once (a second Ctrl-C): what is kept, and what it may go on from.

    ``run_dir`` is None when the run was still loading (it wrote nothing); ``at_the_end``: the last
    snapshot holds the run's last iteration (the final one was saved before the second Ctrl-C).
    """
    if run_dir is None:
        return "collapse-tui: interrupted while loading"
    if last_snapshot is None:
        return f"collapse-tui: interrupted: the records are in {run_dir}; there is no snapshot to resume from"
    end = "its final snapshot" if at_the_end else "no final snapshot was saved; the newest"
    return f"collapse-tui: interrupted: the records are in {run_dir}; {end} is {last_snapshot}"


def _reset_stop_signals(*, stopping: bool) -> None:
    """Once the run is over with no outcome to keep (a crash, a second Ctrl-C), Ctrl-C ends the process
    as the system does, without a word, and so does SIGTERM unless a signal stopped the run.

    Why: ``stop`` raises KeyboardInterrupt for a second Ctrl-C; one landing
    while the interpreter shuts down (its exit callbacks) printed a traceback.
    Once a signal stopped the run, a SIGTERM stays ignored, as in ``stop``:
    the folder is complete and the process ends in a moment.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if stopping else signal.SIG_DFL)


def _leave_at_once_with(code: int, *, stopping: bool) -> None:
    """Once the run has ended, Ctrl-C (and SIGTERM, unless a signal stopped the run) ends the process
    at once, with the run's own exit code.

    Why: after the summary the interpreter takes a moment to shut down (about
    a second on a small machine). A Ctrl-C there exited 130 for a run whose
    folder says it finished, and a script or ``sweep`` reading the exit code
    took a complete run for an interrupted one.
    """

    def leave(signum: int, frame: FrameType | None) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a terminal gone with its SSH session
                stream.flush()
        os._exit(code)

    signal.signal(signal.SIGINT, leave)
    if not stopping:
        signal.signal(signal.SIGTERM, leave)
    if hasattr(signal, "SIGHUP"):  # a terminal gone now changes nothing: the folder is complete
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _catch_stop_signals(stop: Callable[[int, FrameType | None], None]) -> None:
    """The stop signals call ``stop``: a hang-up only when not under nohup (there the run outlives SSH)."""
    for name in STOP_SIGNAL_NAMES:
        signum = getattr(signal, name, None)
        if signum is None:  # no SIGHUP on Windows
            continue
        # SIGINT even where ignored: a shell script's background job starts with SIGINT ignored, and
        # ``kill -INT`` must still stop it
        if signum != getattr(signal, "SIGHUP", None) or signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, stop)
    pass_on_early_interrupt()


def _say(line: str) -> None:
    """One line on stderr, if a terminal is still there to take it."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)
