"""The run folder: one writer and one reader for everything a run produces.

Layout (DESIGN section 4)::

    config.json        resolved configuration, versions, device
    metrics.jsonl      one IterationRecord per line, flushed every iteration
    events.jsonl       start, pause, resume, lr, snapshot, snapshot_failed, collapse, stop, error,
                       resumed_from (``records.EVENT_KINDS``)
    snapshots/iter-N/  model + tokenizer, optimizer and RNG state, the sample (``.partial-iter-N``
                       while it is written)
    summary.json       written at the end (and rewritten on resume)
    process.json       the process writing the run: pid, host, start, state (``follow``)
    commands.jsonl     what watchers asked of the live run (``follow``)
    traceback.txt      only after a crash
    .lock              held by the run that writes the folder (where the OS has ``fcntl``)

The line files are append-only and flushed (and fsynced) line by line, so
killing the process loses at most the iteration in flight, and another
process may read the folder while it is written. Every reader goes through
``read_jsonl``, which skips a half-written last line. The JSON files are
replaced whole (``write_atomic``), snapshots by a rename once complete and on disk
(``sync_folder``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two runs in one folder are then not detected
    fcntl = None  # type: ignore[assignment]

from collapse_tui.config import eval_set_name
from collapse_tui.errors import UserError
from collapse_tui.records import Event, IterationRecord

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
SNAPSHOTS = "snapshots"
LOCK = ".lock"
#: A snapshot is written into ``snapshots/.partial-iter-N`` and renamed to ``iter-N`` once complete.
PARTIAL = ".partial-"
#: A snapshot being replaced by a new one of its iteration is moved to ``snapshots/.replaced-iter-N`` first.
REPLACED = ".replaced-"
#: The mark on the summary written before the final snapshot (``Engine._final_snapshot``): until its
#: process ends, the run is still going.
ENDING_SNAPSHOT = "saving the final snapshot"
#: What a start that never finished an iteration leaves (a quit or a crash while loading, or in the
#: first iteration); a new run given the same --out replaces them.
START_FILES = (CONFIG, METRICS, EVENTS, SUMMARY, "traceback.txt")


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or inf: write them as null so any reader can parse the line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _restore_nan(value: Any) -> Any:
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: _restore_nan(v) for k, v in value.items()}
    return value


def holds_iterations(root: Path) -> bool:
    """Whether ``root`` holds what a run produced: an iteration's record or a snapshot.

    A folder with only a start's files (config, events) does not: a quit
    or a crash before the first iteration ended leaves that, and the same
    ``--out`` should work again.
    """
    metrics = root / METRICS
    if metrics.is_file() and read_jsonl(metrics):
        return True
    snapshots = root / SNAPSHOTS  # a hidden .partial-iter-N is an unfinished write, not a snapshot
    return snapshots.is_dir() and any(not path.name.startswith(".") for path in snapshots.iterdir())


def a_few(names: list[str]) -> str:
    """The first three of ``names`` for a one-line message, and "…" where there are more."""
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def is_run_folder(path: Path) -> bool:
    """A run folder has its config and at least one of its line files.

    A config alone is not enough: a model folder (a snapshot, a hub
    download) has a ``config.json`` too. A folder that cannot be looked
    into (another user's, on a shared disk) is none: ``is_file`` raises
    there, and ``runs`` or ``plot`` of the folder around it gave a traceback.
    """
    try:
        return (path / CONFIG).is_file() and ((path / METRICS).exists() or (path / EVENTS).exists())
    except OSError:
        return False


def enclosing_run_folder(path: Path) -> Path | None:
    """The run folder ``path`` lies inside (by its absolute path), if any: ``runs`` never looks inside
    a run folder, so a run or sweep written there would be lost to it."""
    return next((folder for folder in Path(os.path.abspath(path)).parents if is_run_folder(folder)), None)


def _is_run_config(path: Path) -> bool | None:
    """Whether ``path`` is a run's config.json: None when there is none, False for another's (a model's)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # none there (or its folder is a file: --out a/file/x)
        return None
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "run_dir" in config and "model" in config


def file_size(path: Path) -> int:
    """The size of file ``path``; 0 when there is none."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def why_not_take_over(root: Path) -> str | None:
    """Why a new run may not write into ``root``, or None when it may.

    It may when the folder is new, holds nothing a run writes, or holds what
    a start left before its first iteration ended (a run's config.json, no
    records, no snapshot), which the new start replaces. Files named like a
    run's that no run of ours left (no run config beside them) are the
    user's and stay untouched, and a folder of run folders is a sweep's root,
    where a run of its own would hide them from ``runs``. Nor may it write
    inside another run's folder, where ``runs`` would never find it.
    """
    taken = "already holds a run; choose another --out, or --resume a snapshot"
    is_run = _is_run_config(root / CONFIG)
    if is_run is not None and holds_iterations(root):
        return taken
    around = enclosing_run_folder(root)
    if around is not None:
        return f"is inside the run folder {around}; choose another --out"
    if is_run is not None:
        return None if is_run else "holds a config.json that is not a run's; choose another --out"
    # empty ones are what a start killed before its config was written leaves: nothing to lose
    theirs = [name for name in START_FILES if file_size(root / name)]
    if theirs:  # a stray metrics.jsonl among them: no run's, and not to be written over
        return f"holds {', '.join(theirs)} of no run of this tool; choose another --out"
    if holds_iterations(root):  # snapshots, their run's config gone
        return taken
    runs = list(itertools.islice(_runs_below(root, SEARCH_DEPTH), 4))
    if runs:
        return (
            f"holds run folders ({a_few(runs)}); give a new folder inside it, e.g. --out {root / 'new-run'}"
        )
    return None


#: How deep ``runs`` and ``plot`` look for run folders under the folder they are given
#: (runs/<sweep>/<run>/ is depth 2).
SEARCH_DEPTH = 4


#: Folders ``_runs_below`` looks into at most: ``--out .`` in a project with a data tree or
#: node_modules must not cost seconds (each check reads a config.json; /usr took a second).
SEARCH_FOLDERS = 500


def _runs_below(root: Path, depth: int) -> Iterator[str]:
    """The run folders under ``root`` (as paths from it), as deep as ``runs`` looks, nearest first.

    Why deeper than its children: a ``runs/`` that holds only sweeps holds
    its runs two levels down; a run written into it would hide them all
    from ``runs`` and ``plot``, which stop at the first run folder. Level by
    level, and at most ``SEARCH_FOLDERS`` folders: in a tree too large to
    look through, the runs near the top are the ones found.
    """
    level, looked = [root], 0
    for _ in range(depth):
        below: list[Path] = []
        for folder in level:
            try:
                children = sorted(child for child in folder.iterdir() if not child.name.startswith("."))
            except OSError:
                continue  # missing, or unreadable: creating or writing it says what is wrong
            for child in children:
                looked += 1
                if looked > SEARCH_FOLDERS:
                    return
                try:
                    if not child.is_dir():
                        continue
                except OSError:
                    continue
                if _is_run_config(child / CONFIG):
                    yield str(child.relative_to(root))
                else:
                    below.append(child)
        level = below


def check_new_run_folder(root: Path) -> None:
    """Refuse ``root`` for a new run unless it may be taken over: one message wherever it is asked."""
    if root.exists() and not root.is_dir():
        raise UserError(f"run folder {root} is a file, not a folder; choose another --out")
    why = why_not_take_over(root)
    if why and is_locked_elsewhere(root):  # "or --resume" would be refused too: the run goes on
        raise UserError(
            f"run folder {root} holds a run that another process is writing now; choose another --out "
            f"(collapse-tui watch {root} shows it)"
        )
    if why:
        raise UserError(f"run folder {root} {why}")


#: What ``flock`` says when another process holds the lock.
LOCK_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
#: How often a start takes the folder's ``.lock`` again after finding it removed under its lock.
LOCK_TRIES = 5


def is_locked_elsewhere(root: Path) -> bool:
    """Whether another process holds the folder's lock now: a run going on, or a resume loading."""
    if fcntl is None or Path(root).resolve() in FolderLock._held:
        return False
    try:
        handle = open(Path(root) / LOCK, "rb")  # noqa: SIM115 (closed below)
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            return error.errno in LOCK_BUSY
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a reader never sees half of it, a write that fails
    (a full disk) leaves no temporary file behind, and a power cut after it cannot leave it empty
    (the text is on disk before the rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with _renamed_into_place(path, tmp), open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def writing_whole(path: Path) -> Iterator[Path]:
    """A name beside ``path`` (with its suffix, for writers that go by it) to write the file under;
    renamed onto ``path`` once the block ends, removed if it fails: a write that fails (a full
    disk) leaves the file before it as it was, not cut off."""
    if path.is_symlink():  # a link is written through, as an open() would, not replaced by the file
        path = Path(os.path.realpath(path))
    with _renamed_into_place(path, path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")) as tmp:
        yield tmp


@contextlib.contextmanager
def _renamed_into_place(path: Path, tmp: Path) -> Iterator[Path]:
    """``tmp``, renamed onto ``path`` once the block ends, or removed if the block fails."""
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync_folder(folder: Path) -> None:
    """Put every file under ``folder``, and the folders' entries, on disk (fsync).

    Why: a snapshot is renamed into place once written, and without this a
    power cut or a kernel crash after the rename could leave ``iter-N`` with
    files the page cache never wrote (empty or cut short), which the resume
    it exists for would then fail to load.
    """
    writable = os.O_RDWR if os.name == "nt" else os.O_RDONLY  # Windows flushes only what it may write
    for current, _folders, files in os.walk(folder):
        for name in files:
            descriptor = os.open(os.path.join(current, name), writable)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        sync_folder_entries(Path(current))


def sync_folder_entries(folder: Path) -> None:
    """The folder's own entries (a rename into it, a new file) on disk.

    A no-op where folders cannot be opened (Windows) or synced (some network
    and FUSE filesystems say EINVAL): there a snapshot is as safe as the
    filesystem makes it, and refusing every snapshot would be worse.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def partial_snapshot(final: Path) -> Path:
    """Where snapshot ``final`` (``snapshots/iter-N``) is written before it is complete."""
    return final.with_name(PARTIAL + final.name)


def replaced_snapshot(final: Path) -> Path:
    """Where snapshot ``final`` is moved aside while a new one of its iteration takes its place."""
    return final.with_name(REPLACED + final.name)


def restore_replaced_snapshots(snapshots: Path) -> None:
    """Put back a snapshot moved aside whose replacement never took its place; drop the others.

    Why: replacing ``iter-N`` takes two renames, and a process killed between
    them leaves no ``iter-N`` at all. Only a process that may write the run
    calls this (its writer, or a resume once the run's process is gone).
    """
    for moved in snapshots.glob(REPLACED + "*"):
        final = snapshots / moved.name.removeprefix(REPLACED)
        if final.exists():
            shutil.rmtree(moved, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                moved.rename(final)


def is_ending(summary: dict[str, Any] | None) -> bool:
    """Whether ``summary`` is the one written before the final snapshot, not the run's last word."""
    return summary is not None and "ending" in summary


def ending_snapshot_saved(root: Path, summary: dict[str, Any]) -> bool:
    """For an ``ending`` summary whose process is gone: whether the final snapshot it was saving got saved.

    An ``iter-N`` saved before this branch started is an abandoned branch's, not this end.
    """
    try:  # an ending summary names its end
        final = Path(root) / SNAPSHOTS / f"iter-{int(summary['iterations'])}"
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    saved_at = snapshot_saved_at(final)
    started = summary.get("started")
    return saved_at is not None and saved_at >= (started if isinstance(started, int | float) else 0.0)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete JSON lines of a file; a half-written or garbled line is skipped."""
    return JsonlTail(path).read_new()


class JsonlTail:
    """Follows a growing JSON-lines file, returning only new complete lines.

    Used by watchers of a live run: it remembers the byte offset of the last
    complete line, so a half-written line is read again once it is finished.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        rows = []
        consumed = 0
        for line in chunk.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            consumed += len(line)
            try:
                row = json.loads(line)
            except ValueError:  # garbled, or cut inside a multi-byte character (UnicodeDecodeError)
                continue
            if isinstance(row, dict):
                rows.append(row)
        self.offset += consumed
        return rows


def record_losses(record: IterationRecord | None) -> dict[str, Any] | None:
    """The losses of one iteration, as summaries quote the first and the last."""
    if record is None:
        return None
    return {
        "iteration": record.iteration,
        "gen_loss": record.gen_loss,
        "valid": record.valid,
        "rep4": record.rep4,
    }


def make_summary(
    *,
    status: str,
    reason: str,
    iterations: int,
    collapsed_at: int | None,
    first: IterationRecord | None,
    last: IterationRecord | None,
    lr: float | None,
    model: str,
    run_dir: Path | str,
    **extra: Any,
) -> dict[str, Any]:
    """summary.json: one shape whether the engine wrote it or a watcher describes a run without one."""
    return {
        "status": status,
        "reason": reason,
        "iterations": iterations,
        "collapsed_at": collapsed_at,
        "first": record_losses(first),
        "last": record_losses(last),
        "lr": lr,
        "model": model,
        "run_dir": str(run_dir),
        **extra,
    }


def parse_metrics(rows: list[dict[str, Any]]) -> list[IterationRecord]:
    records = []
    for row in rows:
        try:
            records.append(IterationRecord.from_dict(_restore_nan(row)))
        # OverflowError: an int of Infinity; AttributeError: a "valid" that is not an object
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError):
            continue
    return records


def dedupe_records(records: list[IterationRecord]) -> list[IterationRecord]:
    """One record per iteration, sorted by iteration, the abandoned future of every resume left out.

    A run resumed from a snapshot older than its last iteration writes those
    iterations again. In the order written, a record whose iteration is not
    past the one before it starts the new branch: the old branch's records
    from that iteration on are dropped, so readers (``runs``, ``plot``, the
    summary) see the run as it now stands. (Until the new branch's first
    record is written, ``drop_abandoned_records`` tells them apart.)
    """
    kept: list[IterationRecord] = []
    for record in records:
        while kept and kept[-1].iteration >= record.iteration:
            kept.pop()
        kept.append(record)
    return kept


def drop_abandoned_records(records: list[IterationRecord], events: list[Event]) -> list[IterationRecord]:
    """``records`` without the iterations the last resume abandoned, before its own are written.

    ``dedupe_records`` can only tell the old branch's records apart once the
    new branch has written one; until then (a whole iteration, minutes on a
    large model) readers would show the old branch's last iterations beside
    the resume's dropped collapse. The ``resumed_from`` event settles it: a
    record of its iteration or later written before it (by its time) is the
    old branch's. Records of versions that kept no time are left to
    ``dedupe_records``.
    """
    resumes = [event for event in events if event.event == "resumed_from"]
    if not resumes:
        return records
    resume = resumes[-1]
    return [r for r in records if r.iteration < resume.iteration or not 0 < r.time < resume.time]


#: Events that mark the run's life, not an iteration's: kept across resumes (``RunFolder.current_summary``).
LIFECYCLE_EVENTS = ("start", "stop", "resumed_from")


def drop_abandoned_events(events: list[Event]) -> list[Event]:
    """``events`` without what the iterations abandoned by a resume logged (a collapse, an error...).

    A snapshot of iteration ``r`` holds what happened at boundaries up to
    ``r``; a collapse is kept if its sample (``at``) came before ``r``, an
    error if its iteration did.
    """
    kept: list[Event] = []
    for event in events:
        if event.event == "resumed_from":
            start = event.iteration
            kept = [e for e in kept if e.event in LIFECYCLE_EVENTS or _before_resume(e, start)]
        kept.append(event)
    return kept


def _before_resume(event: Event, start: int) -> bool:
    if event.event == "collapse":
        at = event.data.get("at", event.iteration)
        return isinstance(at, int | float) and at < start
    return event.iteration < start if event.event == "error" else event.iteration <= start


def parse_events(rows: list[dict[str, Any]]) -> list[Event]:
    events = []
    for row in rows:
        try:
            events.append(Event.from_dict(row))
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError):
            continue
    return events


class FolderLock:
    """The advisory lock on a run folder's ``.lock``, shared by everything in this process that uses the folder.

    Why shared: the front end announces its run (``process.json``) before
    the engine opens the folder's files, and both must hold the folder; an
    ``flock`` taken twice by one process through two open files would refuse
    the second. Counted: the file is closed (and the lock dropped) when the
    last holder releases it.
    """

    #: resolved folder → [open .lock file, or None where the folder cannot be locked; holders]
    _held: ClassVar[dict[Path, list[Any]]] = {}
    _guard = threading.Lock()

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.key = self.root.resolve()
        self.holding = False

    def acquire(self) -> FolderLock:
        """Take the folder (the folder must exist); a UserError if another process has it."""
        if self.holding:
            return self
        with self._guard:
            entry = self._held.get(self.key)
            if entry is None:
                entry = self._held[self.key] = [self._lock(), 0]
            entry[1] += 1
        self.holding = True
        return self

    @property
    def locked(self) -> bool:
        """Whether this process holds the folder's lock for real (a filesystem may have no locks)."""
        entry = self._held.get(self.key)
        return self.holding and entry is not None and entry[0] is not None

    def release(self) -> None:
        """Give the folder back (idempotent; never raises: it runs on the way out)."""
        if not self.holding:
            return
        self.holding = False
        with self._guard:
            entry = self._held.get(self.key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._held[self.key]
                if entry[0] is not None:
                    with contextlib.suppress(OSError):
                        entry[0].close()  # closing the file releases the lock

    def _lock(self) -> IO[bytes] | None:
        if fcntl is None:
            return None
        for _ in range(LOCK_TRIES):
            try:
                handle = open(self.root / LOCK, "ab")  # noqa: SIM115 (held until the last release)
            except FileNotFoundError:  # a failed start removed the folder just now: never go on unguarded
                raise UserError(
                    f"run folder {self.root} vanished while the run started; start it again"
                ) from None
            except OSError:
                return None  # a folder we can write but not lock in: go on unguarded
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.close()
                if error.errno in LOCK_BUSY:
                    raise UserError(f"run folder {self.root} is in use by another collapse-tui run") from None
                return None  # a filesystem without locks (some network mounts): go on unguarded
            if self._still_named(handle):
                return handle
            handle.close()  # locked a .lock that a failed start removed meanwhile: take the new one
        raise UserError(
            f"run folder {self.root}: its .lock kept being replaced while the run started; start it again"
        )

    def _still_named(self, handle: IO[bytes]) -> bool:
        """Whether the locked file is still the folder's ``.lock``.

        Why: a start that fails before writing config.json removes its
        ``.lock`` while holding it. A process that opened that file just
        before would lock a file no one else can find, while a third creates
        and locks a new ``.lock``: two runs would both hold the folder.
        """
        try:
            named, held = os.stat(self.root / LOCK), os.fstat(handle.fileno())
        except FileNotFoundError:  # removed, and not made again yet
            return False
        except OSError:  # cannot tell: the lock taken stands, as before this check
            return True
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class RunWriter:
    """Writes a run folder, from the engine's thread; a lock keeps each line whole should another thread log too."""

    def __init__(self, root: Path, *, resuming: bool = False) -> None:
        self.root = Path(root)
        if not resuming:
            check_new_run_folder(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create run folder {self.root}: {error.strerror}") from None
        # Held for the run's life, so that a second run (or resume) in this folder is refused instead of
        # interleaving its lines with this one's; the OS drops the lock if the process dies.
        self._folder_lock = FolderLock(self.root).acquire()
        try:
            self._open(resuming)
        except BaseException:
            self._folder_lock.release()
            raise
        self._lock = threading.Lock()

    def _open(self, resuming: bool) -> None:
        """Prepare the files, under the folder's lock."""
        if not resuming:
            check_new_run_folder(self.root)  # again: another run may have written it since the first look
            for name in START_FILES:  # what a start that never finished an iteration left
                (self.root / name).unlink(missing_ok=True)
        # a process killed inside write_atomic left its temporary file (this one's own are renamed by
        # now); only under a real lock: without one, another process may be writing its own
        for leftover in self.root.glob(".*.tmp") if self._folder_lock.locked else []:
            if not leftover.name.endswith(f".{os.getpid()}.tmp"):
                leftover.unlink(missing_ok=True)
        if resuming:
            restore_replaced_snapshots(self.root / SNAPSHOTS)
            # a process killed while writing a snapshot left it unfinished: never loadable, maybe GBs
            for partial in (self.root / SNAPSHOTS).glob(PARTIAL + "*"):
                shutil.rmtree(partial, ignore_errors=True)
            # a process killed mid-line left a fragment: end it, so the next line parses
            for name in (METRICS, EVENTS):
                path = self.root / name
                if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
                    with open(path, "a", encoding="utf-8") as handle:
                        handle.write("\n")
        # Kept open for the run's life (closed in ``close``): one line per iteration, flushed.
        self._metrics: IO[str] = open(self.root / METRICS, "a", encoding="utf-8")  # noqa: SIM115
        self._events: IO[str] = open(self.root / EVENTS, "a", encoding="utf-8")  # noqa: SIM115

    @staticmethod
    def _append(handle: IO[str], row: dict[str, Any]) -> None:
        handle.write(json.dumps(_json_safe(row), ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())

    def write_config(self, config: dict[str, Any]) -> None:
        self._write_json(CONFIG, config)

    def write_record(self, record: IterationRecord) -> None:
        with self._lock:
            self._append(self._metrics, record.to_dict())

    def write_event(self, event: Event) -> None:
        with self._lock:
            self._append(self._events, event.to_dict())

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write_json(SUMMARY, summary)

    def snapshot_dir(self, iteration: int) -> Path:
        return self.root / SNAPSHOTS / f"iter-{iteration}"

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        """Write atomically, so a reader never sees half a config or summary."""
        write_atomic(self.root / name, json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n")

    def close(self) -> None:
        with self._lock:
            self._metrics.close()
            self._events.close()
            self._folder_lock.release()


@dataclass
class RunFolder:
    """Everything read back from a run folder.

    ``records`` hold one record per iteration, sorted (see ``dedupe_records``);
    ``events`` are in the order they were written.
    """

    root: Path
    config: dict[str, Any]
    records: list[IterationRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def iterations_done(self) -> int:
        """How many iterations the run has done (on its current branch), as ``iter-N`` counts them."""
        return self.records[-1].iteration + 1 if self.records else 0

    @property
    def collapsed_at(self) -> int | None:
        """The iteration whose sample collapsed (the event's ``at``; it is logged before the next one)."""
        for event in self.events:
            if event.event == "collapse":
                at = event.data.get("at")
                return (
                    int(at)
                    if isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at)
                    else event.iteration
                )
        return None

    @property
    def current_summary(self) -> dict[str, Any] | None:
        """The summary, unless the run was resumed after writing it (then it is still going).

        A resume keeps the old ``summary.json`` until it ends, so a summary
        counts only if no ``start`` or ``resumed_from`` event follows the last
        ``stop`` event (runs without stop events are taken at their word); one
        that names its stop event's time (``stopped``) counts only if that is
        the last stop, so the old summary of a resumed run that has just
        stopped does not pass for its new one.
        The summary written before the final snapshot (marked ``ending``)
        comes before its process's stop event: it counts if it names the
        last ``start`` event's time, i.e. no later process has started.
        """
        if self.summary is None:
            return None
        if is_ending(self.summary):
            starts = [e.time for e in self.events if e.event == "start"]
            return self.summary if starts and starts[-1] == self.summary.get("started") else None
        stops = [e.time for e in self.events if e.event == "stop"]
        if "stopped" in self.summary and stops and stops[-1] != self.summary["stopped"]:
            return None  # a resumed run has stopped since, and is writing its own summary
        kinds = [e.event for e in self.events]
        if "stop" not in kinds:
            return self.summary
        last_stop = len(kinds) - 1 - kinds[::-1].index("stop")
        if any(kind in ("start", "resumed_from") for kind in kinds[last_stop + 1 :]):
            return None
        return self.summary

    @property
    def status(self) -> str:
        """finished, collapsed, stopped, crashed or running (no current summary yet).

        Whether a "running" run's process is still alive is not known here:
        ``collapse_tui.follow.is_alive`` tells (``collapse_tui.runs.run_status``).
        """
        summary = self.current_summary
        if summary is not None:
            return str(summary.get("status", "finished"))
        if any(e.event == "error" for e in self.events):
            return "crashed"
        return "running"

    @property
    def eval_names(self) -> list[str]:
        """The evaluation sets' names, in ``--eval`` order: from the records, else the config.

        Read from the data first, so runs from older versions (or with a
        config missing ``eval_sets``) still name their columns right.
        """
        names: list[str] = []
        for record in self.records:
            names += [name for name in record.valid if name not in names]
        if names:
            return names
        if isinstance(self.config.get("eval_sets"), dict):
            return [str(name) for name in self.config["eval_sets"]]
        return [eval_set_name(str(spec)) for spec in self.config.get("evals") or []]


def read_run(root: Path) -> RunFolder:
    """Read a run folder; a folder that is not one gives a clear ``UserError``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder" if root.exists() else f"there is no folder {root}")
    try:
        config = json.loads((root / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        inside = next(_runs_below(root, 1), None)  # `watch runs`, meant one run in it
        hint = f" (it holds runs: give one, e.g. {root / inside})" if inside else ""
        raise UserError(f"{root} is not a run folder: it has no {CONFIG}{hint}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{root / CONFIG} is not valid JSON: {error.msg}") from None
    except UnicodeDecodeError:
        raise UserError(f"{root / CONFIG} is not valid JSON: it is not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"cannot read {root / CONFIG}: {error.strerror}") from None
    if not isinstance(config, dict):
        raise UserError(f"{root / CONFIG} is not a run configuration (a JSON object)")
    if "model" not in config and ("model_type" in config or "architectures" in config):
        raise UserError(f"{root} is a model folder, not a run folder (its {CONFIG} describes a model)")
    try:
        metrics, events = read_jsonl(root / METRICS), read_jsonl(root / EVENTS)
    except OSError as error:  # no permission, or a folder of that name
        raise UserError(f"cannot read {error.filename or root}: {error.strerror or error}") from None
    all_events = parse_events(events)
    return RunFolder(
        root=root,
        config=config,
        records=drop_abandoned_records(dedupe_records(parse_metrics(metrics)), all_events),
        events=drop_abandoned_events(all_events),
        summary=read_summary(root),
    )


def read_summary(root: Path) -> dict[str, Any] | None:
    """``summary.json``, or None while there is none (it is written atomically, so never half)."""
    try:
        summary = json.loads((Path(root) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):  # none yet, or none to read (a folder)
        return None
    return summary if isinstance(summary, dict) else None


def _snapshot_value(snapshot: Path, key: str, kind: type[int] | type[float]) -> Any:
    """``key`` of a snapshot's ``state.json`` as ``kind``; None if that cannot be read."""
    try:
        return kind(json.loads((Path(snapshot) / "state.json").read_text(encoding="utf-8"))[key])
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None


def snapshot_iteration(snapshot: Path) -> int | None:
    """The iteration a snapshot was taken at, from its ``state.json``; None if that cannot be read."""
    return _snapshot_value(snapshot, "iteration", int)


def snapshot_saved_at(snapshot: Path) -> float | None:
    """When a snapshot was written (wall clock), from its ``state.json``; None if that cannot be read.

    Why: a run resumed from an earlier snapshot may reach an iteration that an
    abandoned branch saved too; only the time tells whose ``iter-N`` it is.
    """
    return _snapshot_value(snapshot, "time", float)
