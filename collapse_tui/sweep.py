"""``collapse-tui sweep``: one headless run for every model × learning rate × seed, one after another.

The paper's findings are comparisons: a higher learning rate collapses
faster, a larger model sooner. A sweep runs the grid into one folder
(``SWEEP/<model>-lr<lr>[-seed<seed>]/``, ordinary run folders), then prints
the ``runs`` table of it and draws ``SWEEP/sweep.png`` with ``plot``.

Each run is its own ``collapse-tui headless`` process, so a run that crashes
or runs out of memory costs only itself, and each model's GPU memory is
given back before the next loads. The children run in their own session:
a Ctrl-C, a ``kill`` or a hang-up reaches the sweep only, which passes it on
once (a second Ctrl-C, passed on too, leaves the run at once, as in
``headless``) and starts no further run.

The same command given again goes on where the sweep stopped: a run that
reached its end is left as it is, one that was stopped, killed or crashed
goes on from its newest snapshot, a larger ``--max-iters`` extends them all.
Everything is checked before the first run starts, so a mistake costs one
line and no half-made sweep. This module never imports textual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from collapse_tui.config import (
    RESUME_MAY_CHANGE,
    RunConfig,
    model_name,
    option_flag,
    option_words,
    resolve_config,
)
from collapse_tui.errors import UserError
from collapse_tui.exits import EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED, STOP_SIGNAL_NAMES
from collapse_tui.runfolder import CONFIG, SNAPSHOTS, RunFolder, read_run, snapshot_iteration
from collapse_tui.runs import is_run_folder, run_status, runs_table

#: The options a sweep takes several values of; every other run option is one value for all runs.
SWEPT = ("model", "lr", "seed")
#: What the sweep writes into its folder beside the runs: its plan, and the figure of its runs.
SWEEP_FILE = "sweep.json"
FIGURE = "sweep.png"
#: Keys of a run's config that may differ from the plan without making it another run (the lr it
#: started with names its folder; a key may have changed it since, which the snapshot keeps).
NOT_COMPARED = (RESUME_MAY_CHANGE - {"lr"}) | {"out", "resume", "preset"}


@dataclass(frozen=True)
class PlannedRun:
    """One run of the grid: its folder and its options (the sweep's, with this run's values)."""

    name: str
    run_dir: Path
    options: dict[str, Any]
    config: RunConfig


@dataclass(frozen=True)
class Step:
    """What the sweep does with a planned run: ``start`` it, ``resume`` it from ``snapshot``,
    or ``skip`` it (``why``: done already, or it cannot go on: ``failed``)."""

    action: str
    why: str = ""
    snapshot: Path | None = None
    failed: bool = False


def default_sweep_dir(root: Path = Path("runs")) -> Path:
    """``runs/sweep-<time>/``: sortable by time, like a run folder's default name."""
    return root / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def run_name(model: str, lr: float, seed: int | None) -> str:
    """``<model>-lr<lr>``, with ``-seed<seed>`` when the sweep has several seeds: a folder name."""
    name = f"{model_name(model)}-lr{lr:g}" + ("" if seed is None else f"-seed{seed}")
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def plan_sweep(options: dict[str, Any], sweep_dir: Path) -> list[PlannedRun]:
    """Every run of the grid, in the order given (models, then lrs, then seeds), each one checked.

    ``options`` are the run options as the command line gives them, the swept
    ones as lists (empty: the default, or the preset's value). A value out of
    range or two runs that would share a folder are refused before anything runs.
    """
    values = {key: list(dict.fromkeys(options.get(key) or [None])) for key in SWEPT}
    several_seeds = len(values["seed"]) > 1
    plan: list[PlannedRun] = []
    for model, lr, seed in itertools.product(*(values[key] for key in SWEPT)):
        run_options = {**options, "model": model, "lr": lr, "seed": seed}
        config = resolve_config({**run_options, "out": None})
        name = run_name(config.model, config.lr, config.seed if several_seeds else None)
        run_dir = sweep_dir / name
        clash = next((run for run in plan if run.name == name), None)
        if clash is not None:
            raise UserError(
                f"two runs of the sweep would share the folder {run_dir} "
                f"({model_name(clash.config.model)} and {model_name(config.model)}); give the models "
                "folders of different names"
            )
        run_options["out"] = run_dir
        plan.append(PlannedRun(name, run_dir, run_options, dataclasses.replace(config, out=str(run_dir))))
    return plan


def check_sweep_dir(sweep_dir: Path) -> None:
    """The sweep's folder holds runs; it must not be a run, or a file, or inside a run."""
    for folder in (sweep_dir, *sweep_dir.parents):
        if folder.is_file():
            raise UserError(f"--out {sweep_dir}: {folder} is a file; give the sweep another folder")
        if is_run_folder(folder):
            where = "is a run folder" if folder == sweep_dir else f"is inside the run folder {folder}"
            raise UserError(f"--out {sweep_dir} {where}; a sweep's --out is the folder its runs go in")


def decide(run: PlannedRun) -> Step:
    """What to do with a planned run, from what its folder holds; refuse what would mix two runs."""
    if not is_run_folder(run.run_dir):
        return Step("start")  # check_new_run_folder (in the child) refuses a folder of other things
    folder = read_run(run.run_dir)
    _check_same_run(run, folder)
    status = run_status(folder)
    if status in ("running", "running?"):
        where = "its process is running" if status == "running" else "it may be running on another machine"
        raise UserError(
            f"{run.run_dir}: {where}; wait for it to end, or stop it, before going on with the sweep"
        )
    done = folder.records[-1].iteration + 1 if folder.records else 0
    if status == "NaN loss":
        return Step("skip", f"stopped on a non-finite loss after {done} iterations", failed=True)
    if done >= run.config.max_iters:
        return Step("skip", f"done already ({status}, {done} iterations)")
    if status == "collapsed" and not run.config.keep_going:
        return Step("skip", f"done already (collapsed at iteration {folder.collapsed_at})")
    snapshot = newest_snapshot(folder)
    if snapshot is None:
        return Step(
            "skip",
            f"{status} after {done} iterations with no snapshot to go on from "
            "(move the folder away to run it anew)",
            failed=True,
        )
    return Step("resume", f"{status} after {done} iterations", snapshot=snapshot)


def _check_same_run(run: PlannedRun, folder: RunFolder) -> None:
    """A folder of the sweep holds the run the plan describes, or the sweep is not the same sweep."""
    for key, planned in run.config.to_dict().items():
        if key in NOT_COMPARED or key not in folder.config:
            continue
        if folder.config[key] != planned:
            raise UserError(
                f"{run.run_dir} holds a run with {option_flag(key, folder.config[key])} "
                f"{_shown(folder.config[key])}, not {_shown(planned)}; give the sweep another --out"
            )


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str | list) else str(value)


def newest_snapshot(folder: RunFolder) -> Path | None:
    """The run's newest complete snapshot on its current branch: what a resume may go on from."""
    from collapse_tui.engine import records_on_current_branch  # torch: only where there are runs

    snapshots = [
        (iteration, path)
        for path in (folder.root / SNAPSHOTS).glob("iter-*")
        if (iteration := snapshot_iteration(path)) is not None
        and all((path / name).exists() for name in ("optimizer.pt", "rng.pt", CONFIG))
    ]
    for _, path in sorted(snapshots, reverse=True):
        try:
            records_on_current_branch(path, folder.root)
        except UserError:
            continue  # saved on a branch a resume abandoned
        return path
    return None


def headless_argv(run: PlannedRun, step: Step) -> list[str]:
    """The ``collapse-tui headless`` arguments for ``step``: the run's options, or a resume of it.

    A resume passes only what a resume may change, and never the lr: the
    snapshot keeps the lr a key may have set during the run.
    """
    if step.action == "resume":
        assert step.snapshot is not None
        kept = {k: v for k, v in run.options.items() if k in RESUME_MAY_CHANGE and k != "lr"}
        options = {**kept, "resume": step.snapshot, "max_iters": run.config.max_iters}
    else:
        options = run.options
    return ["headless", *option_words(options)]


class SweepStop:
    """The stop signals of the sweep: each is passed on to the running child, and no run starts after one.

    Each one is passed on as it came: a second Ctrl-C leaves the run at once,
    as in ``headless``, which also ignores the second hang-up of a dropped
    SSH session (the shell's, then the kernel's).
    """

    def __init__(self) -> None:
        #: Why the sweep stops early (a signal's name, or the run that was stopped), once it does.
        self.reason: str | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self._before: dict[int, Any] = {}
        self._pending: int | None = None  # a signal that came while no run was going

    def install(self) -> None:
        for name in STOP_SIGNAL_NAMES:
            signum = getattr(signal, name, None)
            # under nohup the hang-up stays ignored, for the sweep and (inherited) for its runs
            if signum is not None and (name != "SIGHUP" or signal.getsignal(signum) is not signal.SIG_IGN):
                self._before[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.reason = self.reason or signal.Signals(signum).name
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
        else:
            self._pending = signum

    def adopt(self, child: subprocess.Popen[bytes]) -> None:
        """Pass signals on to ``child`` from now on, and one that came while it was being started."""
        self.child = child
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(pending)


def say(line: str) -> None:
    """One line of the sweep's own, if a terminal is still there to take it (SSH may be gone)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, flush=True)


def run_sweep(options: dict[str, Any], sweep_dir: Path | None, command: list[str]) -> int:
    """Plan, check, run every run in turn, then show the table and the figure; return the exit code.

    ``command`` is the sweep's own command line without ``--out``, to say how to go on.
    """
    given_out = sweep_dir is not None
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else default_sweep_dir()
    check_sweep_dir(sweep_dir)
    plan = plan_sweep(options, sweep_dir)
    steps = [decide(run) for run in plan]  # before anything runs: a mistake costs nothing
    again = shlex.join(["collapse-tui", *command, "--out", str(sweep_dir)])
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_sweep_file(sweep_dir, plan, again)
    except OSError as error:
        raise UserError(f"cannot create the sweep folder {sweep_dir}: {error.strerror or error}") from None
    say(
        f"sweep: {len(plan)} runs in {sweep_dir}" + ("" if given_out else f"; to go on after a stop: {again}")
    )
    stop = SweepStop()
    stop.install()
    failed = False
    try:
        for number, (run, step) in enumerate(zip(plan, steps, strict=True), start=1):
            if stop.reason:
                break
            head = f"sweep: [{number}/{len(plan)}] {run.name}"
            if step.action == "skip":
                say(f"{head}: {step.why}")
                failed = failed or step.failed
                continue
            say(
                f"{head}: "
                + ("start" if step.action == "start" else f"{step.why}; going on from {step.snapshot}")
            )
            code = _run_child(headless_argv(run, step), stop)
            if code == EXIT_INTERRUPTED and not stop.reason:
                stop.reason = f"{run.name} was stopped"  # by a signal to its own process
            elif code not in (EXIT_OK, EXIT_INTERRUPTED):
                failed = True
                how = (
                    f"was killed ({signal.Signals(-code).name})"
                    if code < 0
                    else f"ended with exit code {code}"
                )
                say(f"{head}: {how}; the sweep goes on")
    finally:
        stop.uninstall()
    _show_results(plan, sweep_dir)
    if stop.reason:
        say(f"sweep: stopped ({stop.reason}); to go on: {again}")
        return EXIT_INTERRUPTED
    return EXIT_RUN_FAILED if failed else EXIT_OK


def _run_child(argv: list[str], stop: SweepStop) -> int:
    """One run as its own process, in its own session (signals reach it through ``stop`` only)."""
    child = subprocess.Popen([sys.executable, "-m", "collapse_tui.cli", *argv], start_new_session=True)
    stop.adopt(child)
    try:
        return child.wait()  # a signal handled meanwhile does not cut the wait short (PEP 475)
    finally:
        stop.child = None


def _write_sweep_file(sweep_dir: Path, plan: list[PlannedRun], again: str) -> None:
    """``sweep.json``: the command that makes (and goes on with) the sweep, and its runs in order."""
    from collapse_tui.runfolder import write_atomic

    data = {"command": again, "runs": [run.name for run in plan], "written": time.time()}
    write_atomic(sweep_dir / SWEEP_FILE, json.dumps(data, indent=2) + "\n")


def _show_results(plan: list[PlannedRun], sweep_dir: Path) -> None:
    """The ``runs`` table of the sweep's runs, in its order, and ``sweep.png`` of those with records."""
    from rich.console import Console

    from collapse_tui.plot import plot_runs
    from collapse_tui.tables import print_table

    runs = []
    for run in plan:
        with contextlib.suppress(UserError, OSError):
            if is_run_folder(run.run_dir):
                runs.append(read_run(run.run_dir))
    if not runs:
        return
    with contextlib.suppress(OSError, ValueError):
        print_table(Console(), runs_table(runs, title=str(sweep_dir)))
    drawn = [run.root for run in runs if run.records]
    if not drawn:
        return
    try:
        plot_runs(drawn, sweep_dir / FIGURE)
    except UserError as error:
        say(f"sweep: no figure: {error}")
    else:
        say(f"sweep: wrote {sweep_dir / FIGURE}")
