"""Attach to a run another process writes: liveness, steering through the folder, following.

A long run is started headless (tmux, nohup) and watched later, perhaps by
several watchers at once, perhaps after an SSH connection dropped. Everything
goes through the run folder, so nothing but a shared filesystem is needed:

``process.json``
    The process that writes the run announces itself (``RunProcess``): pid,
    host, start time; at a clean end it is marked ``ended``. ``is_alive``
    tells a watcher whether the writer is still there.
``commands.jsonl``
    Watchers append one line per command (``send_command``); the writing
    process tails it (``CommandInbox``) and hands each command to its
    ``RunControls``. The engine applies it at the next iteration boundary and
    records it in ``events.jsonl``, which is how every watcher learns of it.

Watchers may pause, resume, change the learning rate and ask for a snapshot,
but not stop the run: a watcher's quit key must never end a run, and a
deliberate stop is ``kill -INT <pid>`` (the pid is in ``process.json``), which
the headless runner turns into a clean stop.

``FolderSource`` is the ``RunSource`` for ``collapse-tui watch RUN_DIR``: it
replays the folder's history to a listener, then follows new lines until the
run ends, its process is gone, or the watcher detaches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from collapse_tui.config import missing_folders, model_name, remove_if_empty
from collapse_tui.controls import RunControls
from collapse_tui.errors import UserError
from collapse_tui.records import Event, IterationRecord, phase_seconds
from collapse_tui.runfolder import (
    CONFIG,
    EVENTS,
    LOCK,
    METRICS,
    FolderLock,
    JsonlTail,
    RunFolder,
    dedupe_records,
    drop_abandoned_events,
    drop_abandoned_records,
    ending_snapshot_saved,
    file_size,
    is_ending,
    make_summary,
    parse_events,
    parse_metrics,
    read_jsonl,
    read_run,
    read_summary,
    why_not_take_over,
    write_atomic,
)
from collapse_tui.source import EngineListener, RunInfo

PROCESS = "process.json"
COMMANDS = "commands.jsonl"
#: What a watcher may ask of a run (see the module docstring for why not ``stop``).
COMMAND_KINDS = ("pause", "resume", "lr", "snapshot")

# -- who writes the run ------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a Linux process, or None where /proc cannot tell.

    The start time tells a reused pid from the original process; the state
    tells a zombie (exited, not yet reaped) from a living process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


class RunProcess:
    """The announcement in ``process.json`` that this process writes the run.

    Call ``start`` before the run begins (it creates the folder if need be)
    and ``close`` when it ends, however it ends; or use it as a context
    manager. A process killed outright never marks the file, and ``is_alive``
    then finds its pid gone.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / PROCESS
        self.info: dict[str, Any] = {}

    def start(self) -> RunProcess:
        pid = os.getpid()
        stat = _proc_stat(pid)
        self.info = {
            "pid": pid,
            "hostname": socket.gethostname(),
            "started": time.time(),
            "start_ticks": stat[1] if stat else None,
            "argv": sys.argv,
            "state": "running",
        }
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write()
        except OSError as error:
            raise UserError(f"cannot write {self.path}: {error.strerror}") from None
        return self

    def close(self) -> None:
        """Mark the process as ended (idempotent; never raises: it runs on the way out)."""
        if not self.info or self.info.get("state") == "ended":
            return
        self.info = {**self.info, "state": "ended", "ended": time.time()}
        with contextlib.suppress(OSError):
            self._write()

    def _write(self) -> None:
        write_atomic(self.path, json.dumps(self.info, indent=2) + "\n")

    def __enter__(self) -> RunProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_process(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``process.json``, or None if it has none (a run from an older version) or it is garbled."""
    try:
        info = json.loads((Path(run_dir) / PROCESS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def is_alive(run_dir: Path) -> bool | None:
    """Whether the process writing the run is still running.

    True or False where this machine can tell; None where it cannot: no
    ``process.json`` (older runs, or a front end that does not announce
    itself) or a process on another host (a shared filesystem).
    """
    info = read_process(run_dir)
    if info is None:
        return None
    if info.get("state") == "ended":
        return False
    if info.get("hostname") != socket.gethostname():
        return None
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if pid <= 0:  # os.kill would ask about a process group, and always find one
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except (OSError, OverflowError):  # OverflowError: a pid no process can have (a garbled file)
        return None
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, ticks = stat
    if state in ("Z", "X"):
        return False
    recorded = info.get("start_ticks")
    return not (isinstance(recorded, int) and recorded != ticks)  # a reused pid is another process


def taken_up_again(folder: RunFolder, alive: bool | None = None) -> bool:
    """Whether a live process has taken the run up again since its last stop: a resume still loading.

    Until the resume's ``resumed_from`` event (written once the model has
    loaded: seconds, or minutes for a large model) the folder's summary is
    the run before's; the announcement in ``process.json``, written first,
    tells that a new process has the folder. ``alive``: ``is_alive`` of the
    folder, where the caller has just asked it.
    """
    info = read_process(folder.root)
    stops = [event.time for event in folder.events if event.event == "stop"]
    if not info or info.get("state") != "running" or not stops:
        return False
    started = _wall_time(info.get("started"))
    if started is None or started <= stops[-1]:
        return False
    return (is_alive(folder.root) if alive is None else alive) is True


# -- steering through the folder ------------------------------------------------------------


def _check_command(command: str, data: dict[str, Any]) -> None:
    if command not in COMMAND_KINDS:
        raise UserError(f"unknown run command {command!r}: use one of {', '.join(COMMAND_KINDS)}")
    if command == "lr":
        lr = data.get("lr")
        if not (isinstance(lr, int | float) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"learning rate must be a positive number, not {lr!r}")


def send_command(run_dir: Path, command: str, **data: Any) -> None:
    """Ask the run's process for ``command`` (pause, resume, lr with ``lr=…``, snapshot).

    Appends one line to ``commands.jsonl`` in a single ``O_APPEND`` write, so
    any number of watchers may send at once without interleaving lines.
    Raises ``ValueError`` for a bad learning rate (as ``RunControls.set_lr``),
    ``UserError`` for an unknown command or a folder that cannot be written.
    """
    _check_command(command, data)
    run_dir = Path(run_dir)
    row = {"command": command, **data, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
    line = (json.dumps(row) + "\n").encode("utf-8")
    try:  # a missing folder, no permission, a full disk: the run never sees the command
        fd = os.open(run_dir / COMMANDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o664)
        try:
            written = os.write(fd, line)
            while written < len(line):  # only on a signal mid-write; the reader waits for the newline
                written += os.write(fd, line[written:])
        finally:
            os.close(fd)
    except OSError as error:
        raise UserError(f"cannot send {command!r} to {run_dir}: {error.strerror}") from None


#: How often a run's process reads ``commands.jsonl``.
COMMAND_POLL_S = 0.2


def began_after_read(record: IterationRecord, sent_at: float) -> bool:
    """Whether the iteration of ``record`` began after its run had read a command sent at ``sent_at``:
    then that iteration ran with the command applied, or with another sent with it that undid it
    (the run takes every pending command at a boundary: two watchers' pause and resume, or lrs).

    Its start is its end less its phases' seconds; times are the run's host's clock.
    """
    return record.time - phase_seconds(record) > sent_at + COMMAND_POLL_S


def _delivery_bounds(events: list[Event]) -> list[float]:
    """For each event, the iteration below which records go before it: its own, but never past a later
    resume's. The old branch's last events (its ``stop`` at 8, say) come before a ``resumed_from``
    at 3 in the file; the new branch's records 3, 4, 5 must come after the resume, not before its
    old stop, or a screen would draw them and then forget them as abandoned."""
    bounds: list[float] = []
    lowest = math.inf
    for event in reversed(events):
        if event.event == "resumed_from":
            lowest = min(lowest, event.iteration)
        bounds.append(min(event.iteration, lowest))
    return bounds[::-1]


class CommandInbox:
    """For the process that runs the engine: hands watchers' commands to its controls.

    A daemon thread tails ``commands.jsonl`` every ``poll_s`` seconds. Lines
    already there at ``start`` are skipped: they were meant for an earlier
    process of the same run (before a resume). Bad lines and commands a
    watcher may not give (``stop``) are ignored and kept in ``ignored``.
    """

    def __init__(self, run_dir: Path, controls: RunControls, *, poll_s: float = COMMAND_POLL_S) -> None:
        self.run_dir = Path(run_dir)
        self.controls = controls
        self.poll_s = poll_s
        self.tail = JsonlTail(self.run_dir / COMMANDS)
        #: Commands applied and ignored (with why), in order, for logs and tests.
        self.applied: list[dict[str, Any]] = []
        self.ignored: list[tuple[dict[str, Any], str]] = []
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> CommandInbox:
        self.tail.read_new()  # skip what earlier processes were sent
        self._thread = threading.Thread(target=self._loop, name="command-inbox", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> CommandInbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        while not self._closed.wait(self.poll_s):
            self.poll()
        self.poll()  # commands sent just before the end are applied (or at least seen)

    def poll(self) -> list[dict[str, Any]]:
        """Apply the commands that arrived since the last poll; return them."""
        applied = []
        for row in self.tail.read_new():
            reason = self._apply(row)
            if reason is None:
                applied.append(row)
                self.applied.append(row)
            else:
                self.ignored.append((row, reason))
        return applied

    def _apply(self, row: dict[str, Any]) -> str | None:
        """Apply one command; return why it was ignored, or None."""
        command = row.get("command")
        data = {k: v for k, v in row.items() if k != "command"}
        try:
            _check_command(str(command), data)
        except (UserError, ValueError) as error:
            return str(error)
        if command == "pause":
            self.controls.pause()
        elif command == "resume":
            self.controls.resume()
        elif command == "lr":
            self.controls.set_lr(float(data["lr"]))
        elif command == "snapshot":
            self.controls.request_snapshot()
        return None


# -- following a run folder -------------------------------------------------------------------


class FolderControls(RunControls):
    """The controls a watcher's TUI steers: each command goes to the run's process via the folder.

    ``paused`` and ``pending_lr`` follow the run's events (``observe``), set
    ahead of them when this watcher asks, so the screen answers a key at once.

    ``stop`` does NOT stop the run: it only ends this watcher's follow loop
    (``FolderSource.run`` returns promptly), which is what the TUI's quit
    and unmount call. With ``read_only`` the steering methods do nothing and
    send nothing; a TUI should check ``read_only`` and hide those keys.
    """

    stops_the_run = False

    def __init__(self, run_dir: Path, *, read_only: bool = False) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.read_only = read_only
        #: When this watcher asked for a pause the run has not made yet (``observe_record``).
        self._pause_asked: float | None = None
        #: When this watcher asked for the lr still pending.
        self._lr_asked = 0.0

    def _send(self, command: str, **data: Any) -> bool:
        if self.read_only:
            return False
        send_command(self.run_dir, command, **data)
        return True

    def pause(self) -> None:
        if self._send("pause"):
            super().pause()
            self._pause_asked = time.time()

    def resume(self) -> None:
        if self._send("resume"):
            super().resume()

    def set_lr(self, lr: float) -> None:
        # validated by send_command, then shown as pending until the run's lr event
        if self._send("lr", lr=lr):
            super().set_lr(lr)
            self._lr_asked = time.time()

    def request_snapshot(self) -> None:
        self._send("snapshot")

    def stop(self, reason: str = "requested") -> None:
        """End the follow loop only; the watched run goes on."""
        super().stop(reason)

    def observe(self, event: Event) -> None:
        """Keep ``paused`` and ``pending_lr`` as the run's events say (called by ``FolderSource``)."""
        with self._condition:
            if event.event == "pause":
                self._paused = True
                self._pause_asked = None
            elif event.event in ("resume", "start", "resumed_from", "stop"):
                self._paused = False
                self._pause_asked = None
            elif event.event == "lr" and self._pending.lr == event.data.get("lr"):
                self._pending.lr = None

    def forget_requests(self) -> None:
        """Drop what this watcher asked of a run that has ended: a resume that takes it up never reads
        commands sent before it started (``CommandInbox``), so none of them is pending any more."""
        self.take_pending()
        with self._condition:
            self._paused = False
            self._pause_asked = None

    def observe_record(self, record: IterationRecord) -> None:
        """A pause asked for that an iteration begun after the run read it did not make was undone by
        another watcher's resume at the same boundary (the run took both, and logs no event): not
        pausing. Likewise an lr another watcher's replaced: no longer pending."""
        with self._condition:
            if self._pause_asked is not None and began_after_read(record, self._pause_asked):
                self._paused = False
                self._pause_asked = None
            if self._pending.lr is not None and began_after_read(record, self._lr_asked):
                self._pending.lr = None


def run_info(folder: RunFolder, *, read_only: bool = False) -> RunInfo:
    """What a front end shows about a run, from its ``config.json`` (tolerating missing keys).

    A resume may have changed max_iters and lr: its ``resumed_from`` event says so.
    """
    config = dict(folder.config)
    for event in folder.events:
        if event.event == "resumed_from":
            config.update({k: event.data[k] for k in ("max_iters", "lr") if k in event.data})

    def number(key: str, default: float) -> float:
        try:
            return float(config.get(key, default))
        except (TypeError, ValueError):
            return default

    process = read_process(folder.root) or {}

    return RunInfo(
        model=model_name(str(config.get("model", "?"))),
        device=str(config.get("resolved_device") or config.get("device") or "?"),
        max_iters=int(number("max_iters", 0)),
        lr=number("lr", float("nan")),
        eval_names=folder.eval_names,
        collapse_threshold=number("collapse_threshold", 0.9),
        collapse_patience=int(number("collapse_patience", 3)),
        keep_going=bool(config.get("keep_going", False)),
        run_dir=str(folder.root),
        process_started=_wall_time(process.get("started")),
        process_ended=_wall_time(process.get("ended")) if process.get("state") == "ended" else None,
        history_until=max((event.time for event in folder.events), default=None),
        extra={
            "dtype": config.get("autocast_dtype"),
            "inference": config.get("inference"),
            "watching": True,
            "read_only": read_only,
        },
    )


def _wall_time(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summary_of(folder: RunFolder, status: str, reason: str) -> dict[str, Any]:
    """A summary in the engine's shape, for a run that has none (still going, or its process gone)."""
    records = folder.records
    return make_summary(
        status=status,
        reason=reason,
        iterations=records[-1].iteration + 1 if records else 0,
        collapsed_at=folder.collapsed_at,
        first=records[0] if records else None,
        last=records[-1] if records else None,
        lr=records[-1].lr if records else folder.config.get("lr"),
        model=folder.config.get("model", "?"),
        run_dir=folder.root,
    )


#: How long ``watch`` waits for a run folder that is not there yet: a run started a moment before
#: makes it only once its imports are done (1.6 s on a small CPU machine, more with CUDA's).
APPEARING_S = 10.0


def wait_until_started(
    run_dir: Path,
    *,
    poll_s: float = 0.5,
    waiting: Callable[[], None] = lambda: None,
    appearing_s: float = APPEARING_S,
) -> None:
    """Return once a run starting in ``run_dir`` has written its config; at once if none is starting.

    Why: "start it, then watch it" is how a run is watched, and a model takes
    a while to load (a download, minutes). A folder with no run announced in
    it yet is given ``appearing_s`` (the run's process makes the folder and
    its ``process.json`` after its imports). ``waiting`` is called once if
    this has to wait. A start that dies before its config leaves no run: the
    caller's ``FolderSource`` then says the folder is not one.
    """
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).exists():
        return  # started: no need to ask the rest (which reads the whole metrics file)
    if run_dir.exists() and (not run_dir.is_dir() or why_not_take_over(run_dir) is not None):
        return  # a file, or a folder no run could start in (one of runs, say): nothing to wait for
    said = False
    deadline = time.monotonic() + appearing_s
    # a start makes the folder, then (after its lock) process.json: until one of those is there
    # nothing tells a start from a mistyped path, so either gets appearing_s
    while not (run_dir / CONFIG).exists() and (
        is_alive(run_dir) is True or (not (run_dir / PROCESS).exists() and time.monotonic() < deadline)
    ):
        if not said:
            waiting()
            said = True
        time.sleep(poll_s)


class FolderSource:
    """A ``RunSource`` that shows a run folder: its history, then its new lines as they land.

    ``run(listener)`` replays every record and event, then (unless the run
    has ended) polls every ``poll_s`` seconds and forwards new lines. It
    returns the run's summary when the run ends, a "crashed" summary (after
    a synthetic ``process_gone`` event) when the writing process disappears
    without one, or the run's present state (reason "watcher detached") as
    soon as ``close()`` or ``controls.stop()`` is called. None of these
    affect the watched run.
    """

    def __init__(self, run_dir: Path, *, read_only: bool = False, poll_s: float = 0.5) -> None:
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG).exists() and is_alive(run_dir):
            raise UserError(
                f"the run in {run_dir} is still starting (no {CONFIG} yet); try again in a moment"
            )
        self.folder = read_run(run_dir)  # a folder that is not a run fails here, before any screen
        self.run_dir = self.folder.root
        if not read_only and not os.access(self.run_dir, os.W_OK):
            raise UserError(f"cannot steer {self.run_dir}: no permission to write there; add --read-only")
        self.poll_s = poll_s
        self.controls = FolderControls(self.run_dir, read_only=read_only)
        self.info = run_info(self.folder, read_only=read_only)
        #: The folder's two files, read on from where ``run`` last stopped when it follows again.
        self._tails: tuple[JsonlTail, JsonlTail] | None = None
        #: At the run's end as ``run`` last saw it: the time of the folder's newest line (by the run's
        #: clock), which a resume's start comes after; how many records and events it had; the summary.
        self._end_mark = 0.0
        self._seen_at_end: tuple[int, int] | None = None
        self._summary_at_end: dict[str, Any] | None = None

    def close(self) -> None:
        """Stop following (from any thread); ``run`` returns promptly. The run is untouched."""
        self.controls.stop()

    def run(self, listener: EngineListener) -> dict[str, Any]:
        """Replay the folder, then follow it to the run's end; called again (``taken_up``), follow on."""
        if self._tails is None:
            listener.on_status(f"reading {self.run_dir}", None)
            self._tails = JsonlTail(self.run_dir / METRICS), JsonlTail(self.run_dir / EVENTS)
            self.folder.records, self.folder.events = [], []
        metrics, events = self._tails
        self._forward(listener, metrics, events)  # the whole history, or what came since the last end
        summary = self._follow(listener, metrics, events)
        folder = self.folder
        times = [
            item.time for item in (*folder.records, *folder.events) if isinstance(item.time, int | float)
        ]
        self._end_mark = max(times, default=0.0)
        self._seen_at_end = (len(folder.records), len(folder.events))
        self._summary_at_end = summary
        # the elapsed time is the run's process's: a resume followed and gone leaves process.json as it was
        process = read_process(self.run_dir) or {}
        self.info.process_started = _wall_time(process.get("started"))
        self.info.process_ended = (
            _wall_time(process.get("ended")) if process.get("state") == "ended" else None
        )
        return summary

    def taken_up(self) -> bool:
        """Whether, since ``run`` returned at the run's end, a live process has taken the run up again
        (a ``--resume``, started after this watcher saw the end, or in the moment before it announced
        itself): ``run`` may then be called again to follow it. Its start time becomes the run's.

        A process that started after the folder's newest line at the end is a resume, whatever
        ``process.json`` said when the end was seen (it may already have been the resume's). On the
        same host only, as ``is_alive`` can tell.
        """
        info = read_process(self.run_dir)
        started = _wall_time((info or {}).get("started"))
        if not info or info.get("state") != "running" or started is None or started <= self._end_mark:
            return False
        if is_alive(self.run_dir) is not True:
            return False
        self.info.process_started, self.info.process_ended = started, None
        self.controls.forget_requests()
        return True

    def _nothing_since_end(self) -> bool:
        """Whether a run followed again has written nothing since its end (a resume that failed)."""
        return self._seen_at_end == (len(self.folder.records), len(self.folder.events))

    def _follow(self, listener: EngineListener, metrics: JsonlTail, events: JsonlTail) -> dict[str, Any]:
        while True:
            alive = is_alive(self.run_dir)  # before the last look: a clean end leaves its summary first
            self._forward(listener, metrics, events)
            self.folder.summary = read_summary(self.run_dir)
            summary = self.folder.current_summary
            if summary is not None and taken_up_again(self.folder, alive):
                summary = None
            # the summary written before the final snapshot is final once the process is gone
            if summary is not None and (not is_ending(summary) or alive is not True):
                if is_ending(summary) and alive is False and not ending_snapshot_saved(self.run_dir, summary):
                    listener.on_event(self._final_snapshot_lost(summary))
                return summary
            if alive is False:
                if self._summary_at_end is not None and self._nothing_since_end():
                    return self._summary_at_end  # said already: not a second "process gone"
                return self._process_gone(listener)
            if self.controls.stop_requested:
                return summary_of(self.folder, "running", "watcher detached")
            self.controls.wait(self.poll_s)
            if self.controls.stop_requested:
                return summary_of(self.folder, "running", "watcher detached")

    def _forward(self, listener: EngineListener, metrics: JsonlTail, events: JsonlTail) -> None:
        """Deliver new lines: each event before the record of the iteration it applies before."""
        new_records = dedupe_records(parse_metrics(metrics.read_new()))
        new_events = parse_events(events.read_new())
        self.folder.records = dedupe_records([*self.folder.records, *new_records])
        self.folder.events.extend(new_events)
        if any(event.event == "resumed_from" for event in new_events):
            # the old branch's iterations from the resume's on, before the new branch writes its own
            self.folder.records = drop_abandoned_records(self.folder.records, self.folder.events)
            new_records = drop_abandoned_records(new_records, self.folder.events)
            self.folder.events = drop_abandoned_events(self.folder.events)
            # a replay does not show what a later resume abandoned (a collapse, an error...)
            kept = {id(event) for event in self.folder.events}
            new_events = [event for event in new_events if id(event) in kept]
        pending = list(new_records)
        for event, bound in zip(new_events, _delivery_bounds(new_events), strict=True):
            while pending and pending[0].iteration < bound:
                self._deliver(listener, pending.pop(0))
            self.controls.observe(event)
            listener.on_event(event)
        for record in pending:
            self._deliver(listener, record)

    def _deliver(self, listener: EngineListener, record: IterationRecord) -> None:
        self.controls.observe_record(record)
        listener.on_record(record)

    def _final_snapshot_lost(self, summary: dict[str, Any]) -> Event:
        """What a watcher is told of a run whose process ended while it saved its final snapshot
        (killed, a second Ctrl-C): the run ended as its summary says, but its end has no snapshot."""
        iteration = summary.get("iterations")
        message = (
            f"the run's process ended while saving its final snapshot iter-{iteration}, which was not "
            "saved: its end cannot be resumed"
        )
        return Event("snapshot_failed", iteration, data={"message": message, "final": True})

    def _process_gone(self, listener: EngineListener) -> dict[str, Any]:
        info = read_process(self.run_dir) or {}
        host = info.get("hostname", "?")
        message = f"pid {info.get('pid', '?')} on {host} ended without writing a summary"
        records = self.folder.records
        iteration = records[-1].iteration + 1 if records else 0
        listener.on_event(Event("process_gone", iteration, data={"message": message}))
        return summary_of(self.folder, "crashed", "process gone")


@contextlib.contextmanager
def serving_watchers(
    run_dir: Path,
    controls: RunControls,
    *,
    made: Sequence[Path] = (),
    left_as_it_stood: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """While a run goes on in this process: announce it and take watchers' commands.

    Both front ends that run an engine (TUI and headless) wrap ``engine.run``
    in this, after the ``Engine`` has refused a folder that holds another
    run. It takes the folder's lock first, so a second start into a folder
    in use is refused before it touches the first run's ``process.json``.
    If the run never got as far as writing its config (a model that would
    not load, say), the folders it made are removed again, so a typo leaves no
    empty run (or empty ``runs/``, or ``--out``'s new parents) behind
    (``made``: the folders this process created before this for a
    default-named run, innermost first). A resume that left the run as it
    stood puts its ``process.json`` back as it was (``left_as_it_stood``:
    the engine's word for it; without one, whether the records are as many
    as before).
    """
    run_dir = Path(run_dir)
    made_here = list(made) or missing_folders(run_dir.absolute())
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create run folder {run_dir}: {error.strerror}") from None
    try:
        lock = FolderLock(run_dir).acquire()
    except UserError:
        remove_if_empty(made_here)
        raise
    # a resume that adds no iteration (refused while loading, stopped at once) leaves the run as it
    # stood (``Engine.held_events``): its process.json too, which names the process that wrote it
    resuming = file_size(run_dir / METRICS) > 0
    process_before = _text(run_dir / PROCESS) if resuming else None
    # without the engine's word: counted in whole lines (a resume ends a line its crashed run left
    # torn, which adds a byte); read only then, the file may hold megabytes of samples
    records_before = len(read_jsonl(run_dir / METRICS)) if resuming and left_as_it_stood is None else 0
    process = inbox = None
    try:
        process = RunProcess(run_dir).start()
        inbox = CommandInbox(run_dir, controls).start()
        yield
    finally:
        if inbox is not None:
            inbox.close()
        if process is not None:
            process.close()
        as_it_stood = (
            left_as_it_stood() if left_as_it_stood is not None
            else len(read_jsonl(run_dir / METRICS)) == records_before
        )  # fmt: skip
        if process_before is not None and as_it_stood:
            with contextlib.suppress(OSError):
                write_atomic(run_dir / PROCESS, process_before)
        if not (run_dir / CONFIG).exists():  # the folder is still ours (we hold its lock)
            for name in (PROCESS, COMMANDS, LOCK):
                with contextlib.suppress(OSError):
                    (run_dir / name).unlink()
            remove_if_empty(made_here)
        lock.release()


def _text(path: Path) -> str | None:
    """The text of ``path``; None when there is none to read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
