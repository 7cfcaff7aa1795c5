"""What a front end says when a run crashes: one line, with the traceback kept in a file.

A crash is not a user's mistake (those are ``UserError``s), so its traceback
matters for a bug report. But a researcher coming back to a terminal should
read one line that says what happened and where the run's data is, not forty
lines of Python. The traceback goes into the run folder (``traceback.txt``),
or into a temporary file when the run never got a folder.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import tempfile
import traceback
from pathlib import Path

from collapse_tui.errors import ScreenCrashed, in_one_line

#: What makes a file unwritable that is the disk's or the folder's doing, not a bug: a full disk or
#: quota, a folder made read-only. Said as such (the traceback is kept all the same).
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def report_crash(
    error: BaseException,
    run_dir: Path | None,
    *,
    watching: bool = False,
    go_on_from: tuple[Path | None, int] = (None, 0),
) -> Path | None:
    """Print one line about ``error`` on stderr and save its traceback; return where it went.

    Only a folder a run has begun to write (its config.json is there) gets the
    traceback: in a folder the run never got as far as using, a traceback.txt
    would be a file of no run, and the same ``--out`` would be refused next time.
    ``watching``: the crash is a watcher's (``collapse-tui watch``), whose run goes on.
    ``go_on_from``: the snapshot to resume and the iterations recorded since it, which resuming it
    gives up (``Engine.go_on_from``).
    """
    has_folder = run_dir is not None and (Path(run_dir) / "config.json").is_file()
    saved = _save_traceback("".join(traceback.format_exception(error)), Path(run_dir) if has_folder else None)
    what = str(error) if isinstance(error, ScreenCrashed) else in_one_line(error)
    if watching:
        line = f"collapse-tui: the watcher crashed ({what}); the run goes on"
    elif isinstance(error, ScreenCrashed):  # the run itself was stopped as q stops it
        line = f"collapse-tui: the screen crashed ({what}); the run was stopped"
    elif isinstance(error, OSError) and error.errno in UNWRITABLE:
        where = f" ({error.filename})" if error.filename else ""
        then = _how_to_go_on(*go_on_from) if has_folder else "start it again"
        line = (
            f"collapse-tui: the run stopped: a file could not be written{where}: {error.strerror}; "
            f"free some space or mend the folder's permissions, then {then}"
        )
    else:
        line = f"collapse-tui: the run crashed: {what}"
    if has_folder:
        line += f"; its data is kept in {run_dir}"
    if saved is not None:
        line += f"; traceback in {saved}"
    with contextlib.suppress(OSError):  # the terminal may be gone with its SSH session
        print(line, file=sys.stderr)
    return saved


def _how_to_go_on(snapshot: Path | None, recorded_after: int) -> str:
    """After a write failed: resume the newest snapshot, saying what that gives up, or start anew.

    Why say it: a snapshot that failed to save leaves the newest one behind the
    records, and a resume from it sets aside every iteration recorded after it
    (``runs``, ``plot`` and ``watch`` then show the run from there). A folder
    with no snapshot cannot take the same ``--out`` again: it holds a run.
    """
    if snapshot is None:
        return "start it again in a new folder (this one keeps its records)"
    if recorded_after <= 0:
        return f"go on with --resume {snapshot}"
    iterations = f"{recorded_after} iteration{'s' * (recorded_after != 1)}"
    return f"go on with --resume {snapshot}, which gives up the {iterations} recorded after it"


def _save_traceback(text: str, run_dir: Path | None) -> Path | None:
    """``traceback.txt`` in the run folder, else a temporary file; None if neither can be written."""
    if run_dir is not None:
        path = run_dir / "traceback.txt"
        try:
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:  # a full disk: no empty traceback.txt left in the run folder
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        with tempfile.NamedTemporaryFile(
            "w", prefix="collapse-tui-traceback-", suffix=".txt", delete=False, encoding="utf-8"
        ) as handle:
            handle.write(text)
        return Path(handle.name)
    return None
