"""``collapse-tui runs [DIR]``: the runs under a folder, one table row each.

For comparing last week's learning rates at a glance: which model and lr,
how far each got, when it collapsed, how the validation loss moved, and
whether it is still going.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from rich.table import Table
from rich.text import Text

from collapse_tui.config import model_name
from collapse_tui.errors import UserError
from collapse_tui.follow import is_alive, taken_up_again
from collapse_tui.runfolder import (
    CONFIG,
    SEARCH_DEPTH,
    RunFolder,
    ending_snapshot_saved,
    is_ending,
    is_run_folder,
    read_run,
)

#: Marks the status of a run whose final snapshot was not saved: killed (or a second Ctrl-C) while
#: saving it, or the save failed (the table's caption says so).
UNSAVED_END = "*"

STATUS_STYLES = {
    "running": "bold green",
    "running?": "green",
    "finished": "",
    "collapsed": "bold red",
    "stopped": "yellow",
    "crashed": "bold magenta",
    "NaN loss": "bold magenta",
}


def find_runs(
    root: Path, *, max_depth: int = SEARCH_DEPTH, skipped: list[str] | None = None
) -> list[RunFolder]:
    """The run folders at or under ``root``, oldest first.

    Hidden folders and the insides of run folders (their snapshots) are not
    searched. A run folder that cannot be read (a garbled ``config.json``)
    is left out; its one-line reason is appended to ``skipped`` if given, so
    one broken folder does not hide the others.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    runs: list[RunFolder] = []
    for path in _candidates(root, max_depth):
        try:
            runs.append(read_run(path))
        except UserError as error:
            if skipped is not None:
                skipped.append(str(error))
        except OSError as error:  # unreadable files in it (permissions): that folder only
            if skipped is not None:
                skipped.append(f"{path}: {error.strerror or error}")
    return sorted(runs, key=_started)


def _candidates(root: Path, depth: int) -> list[Path]:
    if is_run_folder(root):
        return [root]
    if depth <= 0:
        return []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [run for child in children for run in _candidates(child, depth - 1)]


def _started(run: RunFolder) -> tuple[float, str]:
    """When the run began: its config's ``created``, else its first record, else the config file's time."""
    created = run.config.get("created")
    if isinstance(created, int | float) and not isinstance(created, bool):
        return float(created), str(run.root)
    if run.records and run.records[0].time:
        return run.records[0].time, str(run.root)
    try:
        return os.path.getmtime(run.root / CONFIG), str(run.root)
    except OSError:
        return 0.0, str(run.root)


def run_status(run: RunFolder) -> str:
    """running, finished, collapsed, stopped, "NaN loss" or crashed; "running?" where this machine cannot tell.

    A status ending in ``UNSAVED_END`` is a run whose final snapshot was not
    saved (killed while it saved it, a second Ctrl-C, a full disk): it ended
    that way, but its end cannot be resumed.

    A run with no summary whose process is gone crashed (killed, or the
    machine went down). Liveness is unknown for a run written on another
    host, or by a front end that does not announce its process. A run
    saving its final snapshot (its summary marked ``ending``) is still
    running while its process lives.
    """
    status = run.status
    summary = run.current_summary
    ending = is_ending(summary)
    if status != "running" and not ending:
        if taken_up_again(run):
            return "running"
        # stopped by a non-finite loss: a failure (exit code 1), not a stop the user asked for
        if summary and summary.get("reason") == "non-finite loss":
            return "NaN loss"
        return f"{status}{UNSAVED_END}" if summary and summary.get("final_snapshot_failed") else status
    alive = is_alive(run.root)
    if ending:  # the summary before the final snapshot: final once its process is gone
        if alive:
            return "running"
        saved = ending_snapshot_saved(run.root, summary)
        return status if saved else f"{status}{UNSAVED_END}"  # killed while saving it
    if alive is False:
        return "crashed"
    return "running" if alive else "running?"


def run_names(runs: list[RunFolder]) -> list[str]:
    """Each run's folder name, with as many parent folders as tell it apart from the other runs.

    Sweeps often give runs one name in different folders (``a/lr``, ``b/lr``);
    ``.`` is named by the folder it stands for. Paths are taken as given
    (symbolic links kept, ``..`` folded), without the root.
    """
    paths = [Path(os.path.abspath(run.root)).parts[1:] for run in runs]
    names = ["/".join(parts[-1:]) for parts in paths]
    for depth in range(2, max((len(parts) for parts in paths), default=1) + 1):
        if len(set(names)) == len(names):
            break
        names = ["/".join(parts[-depth:]) for parts in paths]
    return names


def model_label(config: dict) -> str:
    """The run's model as a person names it (``config.model_name``)."""
    return model_name(str(config.get("model", "?")))


def _loss(value: float | None) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "—"


def lr_text(run: RunFolder) -> str:
    """The configured lr, and the last one used where a command changed it."""
    start = run.config.get("lr")
    text = f"{start:.3g}" if isinstance(start, int | float) else "?"
    if run.records and isinstance(start, int | float) and not math.isclose(run.records[-1].lr, start):
        text += f" → {run.records[-1].lr:.3g}"
    return text


def runs_table(runs: list[RunFolder], *, title: str | None = None) -> Table:
    """One row per run: model, lr, iterations, collapse, first and last validation loss, status."""
    names = {run.eval_names[0] for run in runs if run.eval_names}
    valid = (
        f"first, last = validation loss on {names.pop()}"
        if len(names) == 1
        else "first, last = validation loss on each run's first evaluation set"
    )
    statuses = [run_status(run) for run in runs]
    caption = valid
    if "running?" in statuses:
        caption += "; running? = its process is not on this machine, or not recorded"
    if any(status.endswith(UNSAVED_END) for status in statuses):
        caption += (
            f"; {UNSAVED_END} = its final snapshot was not saved (killed while saving it, or it failed)"
        )
    # as text, not markup (nor emoji codes): set names and folders are the user's
    table = Table(title=None if title is None else Text(title), caption=Text(caption))
    table.add_column("run", overflow="fold", min_width=8)
    table.add_column("model", overflow="fold", min_width=6)
    table.add_column("lr", justify="right", overflow="fold")
    for header in ("iters", "collapse", "first", "last"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for run, name, status in zip(runs, run_names(runs), statuses, strict=True):
        style = STATUS_STYLES.get(status.rstrip(UNSAVED_END))
        records = run.records
        first_set = run.eval_names[0] if run.eval_names else None
        first = records[0].valid.get(first_set) if records and first_set else None
        last = records[-1].valid.get(first_set) if records and first_set else None
        collapsed = run.collapsed_at
        table.add_row(  # as text, not markup: folder and model names may hold brackets
            Text(name),
            Text(model_label(run.config)),
            lr_text(run),
            str(run.iterations_done),
            "—" if collapsed is None else str(collapsed),
            _loss(first),
            _loss(last),
            Text(status, style=style or ""),
        )
    return table
