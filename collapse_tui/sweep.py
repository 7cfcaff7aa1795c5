"""``collapse-tui sweep``: one headless run for every model × learning rate × seed, in turn or side by side.

The paper's findings are comparisons: a higher learning rate collapses
faster, a larger model sooner. A sweep runs the grid into one folder
(``SWEEP/<model>-lr<lr>-seed<seed>/``, ordinary run folders), then draws
``SWEEP/sweep.png`` with ``plot`` and prints the ``runs`` table of it.

Each run is its own ``collapse-tui headless`` process, so a run that crashes
or runs out of memory costs only itself, and each model's GPU memory is
given back before the next loads. Given several ``--device``, as many go on
at once, one on each, their output in ``SWEEP/logs/`` (a device where runs
keep failing before they do anything takes no more of them). The runs have a
session of their own: a Ctrl-C, a ``kill`` or a hang-up reaches the sweep
only, which passes it on to every run going (a second Ctrl-C leaves them at
once, as in ``headless``) and starts no further run; a run stopped by a
signal to its own process leaves the sweep going; a sweep that dies without
a word takes its runs with it.

The same command given again goes on where the sweep stopped: a run that
reached its end is left as it is, one that was stopped, killed or crashed
goes on from its newest snapshot, a larger ``--max-iters`` extends them all,
more values add runs. ``sweep.json`` keeps the settings every run shares
(a command with others is refused), the runs and the commands given.
Everything is checked before the first run starts, so a mistake costs one
line and no half-made sweep. This module never imports textual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, sweeps go unguarded as run folders do
    fcntl = None  # type: ignore[assignment]

from collapse_tui.config import (
    DEFAULT_RUNS_ROOT,
    HUB_SETS,
    RESUME_MAY_CHANGE,
    RunConfig,
    absolute_eval,
    claim_folder,
    eval_set_name,
    missing_folders,
    model_name,
    option_flag,
    option_words,
    remove_if_empty,
    resolve_config,
)
from collapse_tui.errors import UserError
from collapse_tui.exits import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    STOP_SIGNAL_NAMES,
    STOP_WITH,
    pass_on_early_interrupt,
)
from collapse_tui.follow import is_alive
from collapse_tui.runfolder import (
    CONFIG,
    METRICS,
    SNAPSHOTS,
    RunFolder,
    a_few,
    enclosing_run_folder,
    holds_iterations,
    is_run_folder,
    read_jsonl,
    read_run,
    snapshot_iteration,
    why_not_take_over,
    write_atomic,
)
from collapse_tui.runs import UNSAVED_END, run_status, runs_table
from collapse_tui.tables import print_table, stop_writing_stdout

#: The options a sweep takes several values of; every other run option is one value for all runs.
SWEPT = ("model", "lr", "seed")
#: ``sweep`` takes these more than once: the swept ones, and the devices its runs go on at once on.
REPEATABLE = (*SWEPT, "device")
#: What the sweep writes into its folder beside the runs: its plan, and the figure of its runs.
SWEEP_FILE = "sweep.json"
FIGURE = "sweep.png"
#: Where the runs' output goes when several go on at once (``--device`` given more than once).
LOGS = "logs"
#: Keys of a run's config that may differ from the plan without making it another run (the lr it
#: started with names its folder; a key may have changed it since, which the snapshot keeps). The
#: collapse rule is compared: it decides where a run stops, which is what a sweep compares.
#: ``text_reading`` is no option, so no command could match an earlier version's: its runs go on
#: reading as they did, and the runs it adds read as this version does.
NOT_COMPARED = (RESUME_MAY_CHANGE - {"lr", "collapse_threshold", "collapse_patience"}) | {
    "out",
    "resume",
    "preset",
    "text_reading",
}


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


def default_sweep_dir() -> Path:
    """``runs/sweep-<time>/``: sortable by time, like a run folder's default name (``-2``, … where a
    sweep started in the same second has it: ``config.claim_folder``)."""
    return DEFAULT_RUNS_ROOT / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def run_name(model: str, lr: float, seed: int) -> str:
    """``<model>-lr<lr>-seed<seed>``, a folder name: the seed always, so that adding seeds to a sweep
    later leaves the names of the runs it has (and so the runs themselves) as they are."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{model_name(model)}-lr{lr:g}-seed{seed}")


def plan_sweep(options: dict[str, Any], sweep_dir: Path) -> list[PlannedRun]:
    """Every run of the grid, in the order given (models, then lrs, then seeds), each one checked.

    ``options`` are the run options as the command line gives them, the swept
    ones as lists (empty: the default, or the preset's value). A value out of
    range, an evaluation file or model folder that is not there, or two runs
    that would share a folder are refused before anything runs; a value given
    twice (``./m`` and ``/home/me/m``, ``1e-4`` and ``0.0001``) is one run.
    """
    values = {key: options.get(key) or [None] for key in SWEPT}
    plan: list[PlannedRun] = []
    for model, lr, seed in itertools.product(*(values[key] for key in SWEPT)):
        run_options = {**options, "model": model, "lr": lr, "seed": seed}
        config = resolve_config({**run_options, "out": None})
        if any(_swept_values(run.config) == _swept_values(config) for run in plan):
            continue
        name = run_name(config.model, config.lr, config.seed)
        clash = next((run for run in plan if run.name == name), None)
        if clash is not None:
            raise UserError(f"{_differing(clash.config, config)} would share the folder {sweep_dir / name}")
        run_options["out"] = sweep_dir / name
        config = dataclasses.replace(config, out=str(sweep_dir / name))
        plan.append(PlannedRun(name, sweep_dir / name, run_options, config))
    _check_inputs_there(plan)
    return plan


def _swept_values(config: RunConfig) -> tuple[Any, ...]:
    return tuple(getattr(config, key) for key in SWEPT)


def _differing(one: RunConfig, other: RunConfig) -> str:
    """The two values of the swept option that two runs differ in, as typed: what makes their names clash."""
    key = next(key for key in SWEPT if getattr(one, key) != getattr(other, key))
    flag = option_flag(key)
    why = " (a folder name keeps 6 digits of the lr)" if key == "lr" else ""
    return f"{flag} {getattr(one, key)} and {flag} {getattr(other, key)}{why}"


def _check_inputs_there(plan: list[PlannedRun]) -> None:
    """A missing evaluation file or model folder would fail its run only when that run starts, maybe hours
    in: look now (a hub id: ``check_models``)."""
    from collapse_tui.data import check_eval_specs  # torch: only once the plan is made

    for spec in plan[0].config.evals:  # before they are read: a pipe would be read to its end first
        path = Path(spec).expanduser()
        if path.exists() and not path.is_file() and not path.is_dir():  # --eval <(…), say
            raise UserError(
                f"--eval {spec} is not a regular file (a pipe?), which the sweep's runs (processes of "
                "their own) could not read; write it to a file and give the file"
            )
    check_eval_specs(plan[0].config.evals)
    for run in plan:
        model = run.config.model
        if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
            raise UserError(f"--model {model}: there is no such model folder")


def check_models(plan: list[PlannedRun]) -> None:
    """Every model of the sweep is one its runs can load: its config read (from the hub, a small
    file), so that a mistyped id, a model not cached while offline or a folder of something else costs
    one line now, not a failed run hours in."""
    from collapse_tui.modeling import context_length, load_causal_lm_config  # transformers: once planned

    for model, block in dict.fromkeys((run.config.model, run.config.block) for run in plan):
        limit = context_length(load_causal_lm_config(model))
        if limit is not None and block > limit:  # what its run would say once it had loaded the model
            raise UserError(
                f"--block {block} is longer than the context of {model} ({limit} tokens); "
                f"give --block {limit} or less"
            )


#: Held by the sweep going on in a folder (an ``flock``): a second sweep there is refused.
SWEEP_LOCK = ".sweep.lock"


def lock_sweep_dir(sweep_dir: Path) -> IO[bytes] | None:
    """Take the sweep's folder for this sweep (None where it is not there yet, or cannot be locked).

    Why: two sweeps in one folder each decide at their start what to do with
    every run; the second would start a run the first then starts again, and
    the first would report a failure that is none. The lock goes with the
    process (closed at exit, or on a kill).
    """
    if fcntl is None or not sweep_dir.is_dir():
        return None
    try:
        handle = open(sweep_dir / SWEEP_LOCK, "ab")  # noqa: SIM115 (held for the sweep's life)
    except OSError:
        return None  # a folder we cannot write in: the sweep will say so
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(
                f"another sweep is going on in {sweep_dir}; wait for it to end (or stop it) and give "
                "the command again"
            ) from None
        return None  # a filesystem without locks: as before
    return handle


def check_eval_sets(plan: list[PlannedRun]) -> None:
    """Every evaluation set can be read, and holds a window of ``--block``, in each starting model's
    tokens: a hub set not cached while offline, or a file shorter than the block, failed every run
    one after another, each after loading its model."""
    from collapse_tui.data import eval_windows, load_eval_text, tokenize  # torch, transformers: once planned
    from collapse_tui.modeling import load_tokenizer

    config = plan[0].config
    texts = {
        eval_set_name(spec): load_eval_text(spec) for spec in config.evals
    }  # once: a hub set takes seconds
    for model in dict.fromkeys(run.config.model for run in plan):
        tokenizer = load_tokenizer(model)
        for name, text in texts.items():
            eval_windows(tokenize(tokenizer, text), config.block, config.eval_tokens, name)


def check_sweep_dir(sweep_dir: Path) -> None:
    """The sweep's folder holds runs; it must not be a run, or a file, or inside a run."""
    for folder in (sweep_dir, *Path(os.path.abspath(sweep_dir)).parents):
        if folder.exists() and not folder.is_dir():  # a file, or a device (--out /dev/null/x)
            raise UserError(
                f"the sweep's folder {sweep_dir}: {folder} is not a folder; give --out another folder"
            )
    around = sweep_dir if is_run_folder(sweep_dir) else enclosing_run_folder(sweep_dir)
    if around is not None:
        where = "is a run folder" if around == sweep_dir else f"is inside the run folder {around}"
        raise UserError(
            f"the sweep's folder {sweep_dir} {where}; a sweep's --out is the folder its runs go in"
        )
    if sweep_dir.is_dir() and not (sweep_dir / SWEEP_FILE).exists():
        # runs of no sweep (``runs/`` itself, say): it would become a sweep's, figure and all
        try:
            theirs = sorted(
                child.name
                for child in sweep_dir.iterdir()
                if is_run_folder(child) or (child / SWEEP_FILE).is_file()  # a run, or another sweep
            )
        except OSError:
            theirs = []
        if theirs:
            raise UserError(
                f"the sweep's folder {sweep_dir} holds runs or sweeps of no sweep ({a_few(theirs)}); give the "
                f"sweep a new folder, e.g. --out {sweep_dir / 'sweep-1'}"
            )


def decide(run: PlannedRun) -> Step:
    """What to do with a planned run, from what its folder holds; refuse what would mix two runs."""
    if is_alive(run.run_dir):  # loading or iterating: a start or a resume would find it locked
        raise UserError(
            f"{run.run_dir}: its process is running; wait for it to end, or stop it, "
            "before going on with the sweep"
        )
    if why_not_take_over(run.run_dir) is None:
        # nothing there, or a start that ended before its first iteration: headless starts it (again)
        return Step("start")
    if not is_run_folder(run.run_dir):
        return Step("start")  # the child refuses a folder of other things with its own one line
    folder = read_run(run.run_dir)
    _check_same_run(run, folder)
    status = run_status(folder)
    done = folder.iterations_done
    if status == "NaN loss":
        return Step("skip", f"stopped on a non-finite loss after {done} iterations", failed=True)
    if done >= run.config.max_iters:
        return Step("skip", f"done already ({status}, {done} iterations)")
    if status.removesuffix(UNSAVED_END) == "collapsed" and not run.config.keep_going:
        # killed while saving its final snapshot (collapsed*), it collapsed all the same
        unsaved = "; its final snapshot was not saved" if status.endswith(UNSAVED_END) else ""
        return Step("skip", f"done already (collapsed at iteration {folder.collapsed_at}{unsaved})")
    if status == "running?":  # as --resume takes it: this machine cannot tell, and the folder is locked
        status = "not running here (its process is on another machine, or not recorded)"
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
    planned = {k: v for k, v in run.config.to_dict().items() if k not in NOT_COMPARED}
    difference = _first_difference(folder.config, planned)
    if difference:
        raise UserError(f"{run.run_dir} holds a run with {difference}; {SAME_SETTINGS}")


#: What to do about a command whose settings are not the sweep's.
SAME_SETTINGS = (
    "a sweep's runs share every setting but --model, --lr and --seed: give the values its runs have "
    f"({SWEEP_FILE} lists the commands given), or give this sweep another --out"
)


def _first_difference(recorded: dict[str, Any], planned: dict[str, Any]) -> str | None:
    """``--flag RECORDED, not PLANNED`` for the first setting both name and set differently, if any.

    Evaluation sets are compared by name: the same file at a new path (a project moved to another
    disk) is the same set, and ``check_eval_texts`` makes sure its text is the same too.
    """
    for key, value in planned.items():
        if key == "collapse_threshold" and recorded.get(key) == 1:
            continue  # an older version's run, whose rule could never trigger: no value given now is 1
        if key in recorded and _comparable(key, recorded[key]) != _comparable(key, value):
            return f"{option_flag(key, recorded[key])} {_shown(recorded[key])}, not {_shown(value)}"
    return None


def _comparable(key: str, value: Any) -> Any:
    """A file by its set's name, a hub set as itself (a file wikitext-2.txt is not the hub's set)."""
    if key == "evals" and isinstance(value, list):
        return [spec if spec in HUB_SETS else ("file", eval_set_name(str(spec))) for spec in value]
    return value


def check_eval_texts(plan: list[PlannedRun], earlier: list[str], sweep_dir: Path) -> None:
    """The evaluation files hold the text the sweep's runs so far were evaluated on.

    Why before anything runs: a file edited since would fail each resumed run
    once it had loaded its model (the resume's own check), while the runs
    that start afresh would go on with the new text, making runs that cannot
    be compared side by side in one table and one figure.
    """
    from collapse_tui.data import load_eval_text, text_digest  # torch: only once the plan is made

    specs = [spec for spec in plan[0].config.evals if spec not in HUB_SETS]
    if not specs:
        return
    digests = {eval_set_name(spec): text_digest(load_eval_text(spec)) for spec in specs}
    for name in dict.fromkeys([*earlier, *(run.name for run in plan)]):
        try:
            recorded = json.loads((sweep_dir / name / CONFIG).read_text(encoding="utf-8")).get("eval_sets")
        except (OSError, ValueError, AttributeError):
            continue  # no run there yet (or not readable: decide says so)
        for set_name, digest in digests.items():
            was = (recorded or {}).get(set_name) if isinstance(recorded, dict) else None
            was_digest = was.get("text_sha256") if isinstance(was, dict) else None
            if was_digest and was_digest != digest:
                raise UserError(
                    f"--eval {set_name}: the text differs from the one the sweep's run {name} was evaluated "
                    "on; a sweep's runs evaluate on the same text: put the file back as it was, or give "
                    "this sweep another --out"
                )


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str | list) else str(value)


def newest_snapshot(folder: RunFolder) -> Path | None:
    """The run's newest complete snapshot on its current branch: what a resume may go on from."""
    from collapse_tui.engine import (  # torch: only where there are runs
        SNAPSHOT_FILES,
        check_on_current_branch,
    )

    snapshots = [
        (iteration, path)
        for path in (folder.root / SNAPSHOTS).glob("iter-*")
        if (iteration := snapshot_iteration(path)) is not None
        and all((path / name).exists() for name in SNAPSHOT_FILES)
    ]
    for _, path in sorted(snapshots, reverse=True):
        try:
            check_on_current_branch(path, folder)
        except UserError:
            continue  # saved on a branch a resume abandoned
        return path
    return None


def headless_argv(run: PlannedRun, step: Step, device: str | None = None) -> list[str]:
    """The ``collapse-tui headless`` arguments for ``step``: the run's options, or a resume of it,
    on ``device`` (None: the default device, or the one a resume keeps).

    A resume passes only what a resume may change, and never the lr: the
    snapshot keeps the lr a key may have set during the run. The evaluation
    sets go too: the sweep may have been given them at a new path (a sweep
    moved to another disk), which a resume takes for the same sets.
    """
    if step.action == "resume":
        assert step.snapshot is not None
        kept = {
            k: v for k, v in run.options.items() if (k in RESUME_MAY_CHANGE and k != "lr") or k == "evals"
        }
        options = {**kept, "resume": step.snapshot, "max_iters": run.config.max_iters}
    else:
        options = dict(run.options)
    if device is not None:
        options["device"] = device
    return ["headless", *option_words(options)]


class SweepStop:
    """The sweep's stop signals: each is passed on to every run going, and no run starts after one.
    A Ctrl-Z suspends the runs going with the sweep.

    Each one is passed on as it came: a second Ctrl-C leaves the runs at
    once, as in ``headless``, which ignores a SIGTERM or a hang-up once it
    is stopping (a scheduler's SIGTERM reaches the runs too, and a dropped
    SSH session sends two hang-ups).
    """

    def __init__(self) -> None:
        #: The first stop signal's name, once one came: the sweep starts no further run.
        self.reason: str | None = None
        self.children: list[subprocess.Popen[bytes]] = []
        self._before: dict[int, Any] = {}
        self._signum: int | None = None
        #: A run is being started (``starting``): a Ctrl-Z then waits until it can suspend that run too.
        self._starting = False
        self._suspend_waiting = False

    def install(self) -> None:
        for name in STOP_SIGNAL_NAMES:
            signum = getattr(signal, name, None)
            # under nohup the hang-up stays ignored, for the sweep and (inherited) for its runs
            if signum is not None and (name != "SIGHUP" or signal.getsignal(signum) is not signal.SIG_IGN):
                self._before[signum] = signal.signal(signum, self._handle)
        suspend = getattr(signal, "SIGTSTP", None)
        # not where Ctrl-Z is ignored (no job control): there it suspends nothing
        if suspend is not None and signal.getsignal(suspend) is signal.SIG_DFL:
            self._before[suspend] = signal.signal(suspend, self._suspend)
        pass_on_early_interrupt()

    def uninstall(self) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.reason = self.reason or signal.Signals(signum).name
        self._signum = self._signum or signum
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

    def _suspend(self, signum: int, frame: FrameType | None) -> None:
        """Ctrl-Z: the runs going stop with the sweep, and go on when it does (``fg``, ``bg``).

        Why by hand: the terminal's Ctrl-Z reaches the sweep only (its runs
        have sessions of their own), and a SIGTSTP sent on would be dropped
        (a run's process group has no parent in its session), so they get
        SIGSTOP, which cannot be dropped, and SIGCONT once the sweep is
        continued.
        """
        if self._starting:  # a run between Popen and adopt: ``starting`` suspends it with the rest
            self._suspend_waiting = True
            return
        held = [child for child in self.children if child.poll() is None]
        for child in held:  # its process group: what the run may have started too (it leads its session)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)  # stops here, as a Ctrl-Z would have; returns once continued
        for child in held:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """While a run is started and adopted: a Ctrl-Z that comes meanwhile is acted on after, so that
        the new run is suspended with the others instead of running on while the sweep is stopped."""
        self._starting = True
        try:
            yield
        finally:
            self._starting = False
            if self._suspend_waiting:
                self._suspend_waiting = False
                self._suspend(signal.SIGTSTP, None)

    def adopt(self, child: subprocess.Popen[bytes]) -> None:
        """Pass signals on to ``child`` from now on; if one came while it was being started, pass
        that on now (the sweep started it after deciding to, before the signal's handler ran)."""
        self.children.append(child)
        if self._signum is not None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(self._signum)

    def release(self, child: subprocess.Popen[bytes]) -> None:
        self.children.remove(child)


def run_sweep(options: dict[str, Any], sweep_dir: Path | None) -> int:
    """Plan and check everything, run the runs, then draw the figure and print the table; the exit code."""
    given_out = sweep_dir is not None
    devices = list(options.get("device") or [None])
    default = default_sweep_dir()
    made = [] if given_out else missing_folders(default.parent)
    # a default name is claimed (made) at once: two sweeps started in the same second get a folder each
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else claim_folder(default, "sweep folder")
    lock = None
    try:
        check_sweep_dir(sweep_dir)
        lock = lock_sweep_dir(sweep_dir)  # before deciding what to do with its runs
        _check_devices(devices)
        plan = plan_sweep({**options, "device": None}, sweep_dir)
        earlier = _earlier_runs(sweep_dir, plan)
        check_eval_texts(plan, earlier, sweep_dir)
        steps = [decide(run) for run in plan]  # before anything runs: a mistake costs nothing
        # last, as it may ask the hub; only runs that start load their model (a resume, its snapshot)
        starting = [run for run, step in zip(plan, steps, strict=True) if step.action == "start"]
        check_models(starting)
        if starting:
            check_eval_sets(starting)
    except BaseException:  # a mistake, or a Ctrl-C while a model's config is looked up on the hub
        if lock is not None:
            lock.close()
        if not given_out:  # the default folder claimed for it: the lock's file (taken or not) would keep it
            (sweep_dir / SWEEP_LOCK).unlink(missing_ok=True)
        remove_if_empty([] if given_out else [sweep_dir, *made])  # what was made for it, still empty
        raise
    again = command_again(options, sweep_dir)
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # a folder new to this sweep: taken now, before its first run (a second sweep given the same
        # new folder a moment ago is refused here, with nothing run)
        lock = lock or lock_sweep_dir(sweep_dir)
        _write_sweep_file(sweep_dir, plan, earlier, again)
    except OSError as error:
        raise UserError(f"cannot create the sweep folder {sweep_dir}: {error.strerror or error}") from None
    at_once = f", {len(devices)} at once ({', '.join(map(str, devices))})" if len(devices) > 1 else ""
    say(
        f"sweep: {len(plan)} run{'' if len(plan) == 1 else 's'} in {sweep_dir}{at_once}"
        + ("" if given_out else f"; to go on after a stop: {again}")
    )
    stop = SweepStop()
    stop.install()  # until the end: a signal during the table and figure stops nothing half-way
    try:
        outcome = _run_plan(plan, steps, stop, devices, sweep_dir / LOGS)
        _show_results([*earlier, *(run.name for run in plan if run.name not in earlier)], sweep_dir)
    finally:
        stop.uninstall()
    if stop.reason:
        say(f"sweep: stopped ({stop.reason}); to go on: {again}")
        return EXIT_INTERRUPTED
    if outcome.failed:
        # last, below the table: a run that failed before its first iteration is not in it
        count = f"{len(outcome.failed)} of {len(plan)} runs" if len(plan) > 1 else "its run"
        lines = "their lines above say" if len(outcome.failed) > 1 else "its line above says"
        say(
            f"sweep: {count} failed or could not go on ({a_few(outcome.failed)}; {lines} why); "
            f"once that is mended, to go on: {again}"
        )
        return EXIT_RUN_FAILED
    if outcome.stopped:
        say(f"sweep: {', '.join(outcome.stopped)} stopped on its own; to go on with it: {again}")
        return EXIT_INTERRUPTED
    return EXIT_OK


def _check_devices(devices: list[str | None]) -> None:
    """A device that is not there would fail every run given to it, hours apart: look now."""
    if any(device is not None for device in devices):
        from collapse_tui.modeling import resolve_device  # torch: only where devices were given

        for device in devices:
            if device is not None:
                resolve_device(device)


@dataclass
class Outcome:
    """How the runs of a sweep went: those that failed or could not go on, those stopped on their own
    (a signal to a run's own process, not to the sweep)."""

    #: The runs that failed or could not go on, for the sweep's last line.
    failed: list[str] = dataclasses.field(default_factory=list)
    stopped: list[str] = dataclasses.field(default_factory=list)


@dataclass
class _Going:
    """A run of the sweep under way: its process, the device it has, and how the sweep names it."""

    run: PlannedRun
    child: subprocess.Popen[bytes]
    device: str | None
    head: str
    log: Path | None
    #: How many iterations its folder held when it started: a failure with no more did none.
    iterations_before: int


def _run_plan(
    plan: list[PlannedRun], steps: list[Step], stop: SweepStop, devices: list[str | None], logs: Path
) -> Outcome:
    """The steps in order, as many at once as there are devices, until a stop.

    With one device a run writes to the sweep's own terminal (its progress bar); with several,
    each run's output goes to ``logs/<run>.log``, and the sweep says when each starts and ends.
    """
    outcome = Outcome()
    free = list(devices)
    retiring = DeviceRetirement(devices)
    going: list[_Going] = []
    todo = list(enumerate(zip(plan, steps, strict=True), start=1))
    while todo or going:
        while todo and free and not stop.reason:
            number, (run, step) = todo.pop(0)
            head = f"sweep: [{number}/{len(plan)}] {run.name}"
            if step.action == "skip":
                say(f"{head}: {step.why}")
                if step.failed:
                    outcome.failed.append(run.name)
                continue
            device = free.pop(0)
            log = logs / f"{run.name}.log" if len(devices) > 1 else None
            what = "start" if step.action == "start" else f"{step.why}; going on from {step.snapshot}"
            where = f" on {device}" if len(devices) > 1 else ""
            say(f"{head}: {what}{where}" + (f" (output: {log})" if log else ""))
            before = _iterations_in(run.run_dir)
            child = _start_child(headless_argv(run, step, device), stop, log, _threads(device, devices))
            going.append(_Going(run, child, device, head, log, before))
        if not going:
            break
        ended = _wait_for_one(going)
        going.remove(ended)
        stop.release(ended.child)
        failed = _report_end(ended, stop, outcome)
        did_nothing = _iterations_in(ended.run.run_dir) <= ended.iterations_before
        free.extend(retiring.freed(ended.device, failed and did_nothing))
    return outcome


class DeviceRetirement:
    """With several devices: one on which runs keep failing before they do anything takes no more runs.

    Why: a GPU that someone else's job has filled fails every run given to
    it within seconds, and would take one queued run after another while the
    others take hours over theirs. Two such failures in a row retire a
    device, unless a run on another device failed that way meanwhile. The
    last device is never retired, and a run failing the same way on a device
    still working brings the retired ones back: the runs fail, not the
    devices (a model too large for any of them, say).
    """

    IN_A_ROW = 2

    def __init__(self, devices: list[str | None]) -> None:
        #: The devices still taking runs (one given twice is one device, with two slots).
        self.working = list(dict.fromkeys(devices))
        #: The slots of retired devices, given back if they come back.
        self.retired_slots: list[str | None] = []
        self._in_a_row: dict[str | None, int] = {}
        #: Runs ended so far, which orders the failures: where each device's current streak of
        #: failures began, and each device's latest failure.
        self._ended = 0
        self._streak_began: dict[str | None, int] = {}
        self._failed_at: dict[str | None, int] = {}

    def freed(self, device: str | None, failed_before_any_iteration: bool) -> list[str | None]:
        """The slots that take runs again now that a run on ``device`` has ended (and say what changed)."""
        if device not in self.working:  # retired while this run went on in its other slot
            self.retired_slots.append(device)
            return []
        self._ended += 1
        if failed_before_any_iteration:
            if not self._in_a_row.get(device):
                self._streak_began[device] = self._ended
            self._failed_at[device] = self._ended
        self._in_a_row[device] = self._in_a_row.get(device, 0) + 1 if failed_before_any_iteration else 0
        if failed_before_any_iteration and self.retired_slots:
            back = list(dict.fromkeys(self.retired_slots))
            say(
                f"sweep: runs fail on {device} too, so the fault is theirs: "
                f"{', '.join(map(str, back))} take runs again"
            )
            self.working.extend(back)
            self._in_a_row = dict.fromkeys(self.working, 0)  # every device starts afresh
            slots, self.retired_slots = [device, *self.retired_slots], []
            return slots
        # a run failing on another device too since this device's streak began: the runs' fault, not
        # this device's (a broken model failing on each device in turn); an older failure there is not
        # (that device may have been busy for hours since, with a run that works)
        began = self._streak_began.get(device, self._ended)
        failing_elsewhere = any(
            self._failed_at.get(other, 0) >= began for other in self.working if other != device
        )
        if self._in_a_row[device] < self.IN_A_ROW or len(self.working) < 2 or failing_elsewhere:
            return [device]
        self.working.remove(device)
        self.retired_slots.append(device)
        say(
            f"sweep: {self.IN_A_ROW} runs in a row failed on {device} before their first iteration; "
            f"it takes no more runs (the others go on {', '.join(map(str, self.working))})"
        )
        return []


def _iterations_in(run_dir: Path) -> int:
    """The iteration lines a run folder holds (0 for none yet)."""
    try:
        return len(read_jsonl(run_dir / METRICS))
    except OSError:
        return 0


def _wait_for_one(going: list[_Going]) -> _Going:
    """The first run to end (a signal handled meanwhile does not cut the wait short)."""
    if len(going) == 1:
        going[0].child.wait()
        return going[0]
    while True:
        for one in going:
            if one.child.poll() is not None:
                return one
        time.sleep(0.2)


def _report_end(ended: _Going, stop: SweepStop, outcome: Outcome) -> bool:
    """Say how a run's process ended, from what its folder holds as much as from its exit code;
    whether it failed.

    With one run at a time its own output has said most of it already; a
    failure is always said (with several at once, with its log's last line).
    """
    code = ended.child.returncode
    several = ended.log is not None
    if code == EXIT_OK:
        if several:
            say(f"{ended.head}: {_how_it_stands(ended.run.run_dir)}")
        return False
    signalled = code == EXIT_INTERRUPTED or (code < 0 and signal.Signals(-code).name in STOP_SIGNAL_NAMES)
    if stop.reason and not holds_iterations(ended.run.run_dir):
        say(f"{ended.head}: stopped while starting ({stop.reason})")
        if ended.log is not None and ended.log.is_file() and not ended.log.stat().st_size:
            ended.log.unlink()  # its folder went (nothing was run): its empty log too
        return False
    if signalled:
        # a resume stopped while it loaded did nothing: the folder still says how the run stood before
        before = _iterations_in(ended.run.run_dir) <= ended.iterations_before and ended.iterations_before
        prefix = "stopped before going on; it stands as before: " if before else ""
        say(f"{ended.head}: {prefix}{_how_it_stands(ended.run.run_dir)}")
        if not stop.reason:  # a signal to the run's own process: the sweep goes on with the others
            outcome.stopped.append(ended.run.name)
        return False
    outcome.failed.append(ended.run.name)
    how = f"was killed ({signal.Signals(-code).name})" if code < 0 else f"ended with exit code {code}"
    last = _last_line(ended.log) if ended.log else ""
    say(
        f"{ended.head}: {how}"
        + (f": {last}" if last else "")
        + ("" if stop.reason else "; the sweep goes on")
    )
    return True


def _last_line(log: Path) -> str:
    """The last line a run wrote: its error, where it failed."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def _how_it_stands(run_dir: Path) -> str:
    """A run's status and iterations as ``runs`` gives them, and what a sweep could go on from."""
    try:
        folder = read_run(run_dir)
    except (UserError, OSError):
        return "ended"
    done = folder.iterations_done
    status = run_status(folder)
    if status.removesuffix(UNSAVED_END) in ("finished", "collapsed"):
        return f"{status} after {done} iterations"
    snapshot = newest_snapshot(folder)
    if snapshot is None:
        return f"{status} after {done} iterations, with no snapshot to go on from"
    return f"{status} after {done} iterations; its newest snapshot is {snapshot.name}"


def command_again(options: dict[str, Any], sweep_dir: Path) -> str:
    """The command that goes on with this sweep, from any folder: its paths made absolute."""
    absolute = dict(options)
    absolute["evals"] = [absolute_eval(str(spec)) for spec in options.get("evals") or []]
    absolute["model"] = [  # a model that is a folder here, as the run takes it (config.absolute_paths)
        os.path.abspath(os.path.expanduser(model)) if Path(os.path.expanduser(model)).is_dir() else model
        for model in options.get("model") or []
    ]
    return shlex.join(["collapse-tui", "sweep", *option_words(absolute), "--out", os.path.abspath(sweep_dir)])


def _threads(device: str | None, devices: list[str | None]) -> dict[str, str]:
    """For a run on the CPU beside others on the CPU: its share of the cores (``OMP_NUM_THREADS``).

    Why: each torch process takes every core, and two of them spinning for
    the same cores ran a tiny sweep 19 times slower than one after the other.
    A value the user set is kept.
    """
    on_cpu = [d for d in devices if _is_cpu(d)]
    if not _is_cpu(device) or len(on_cpu) < 2 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(on_cpu)))}


def _is_cpu(device: str | None) -> bool:
    """Whether a run given ``device`` goes on the CPU: ``cpu``, or ``auto`` where there is no CUDA."""
    if device != "auto":
        return device is not None and device.startswith("cpu")
    from collapse_tui.modeling import resolve_device  # torch: only for auto

    return resolve_device(device).type == "cpu"


def _start_child(
    argv: list[str], stop: SweepStop, log: Path | None, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """One run as its own process, in its own session: signals reach it through ``stop`` only, and it
    stops (as on a SIGTERM) if the sweep dies without a word (``kill -9``; see ``exits.STOP_WITH``).
    Its output goes to ``log`` if given (appended: a run gone on with adds to its log)."""
    output = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        output = open(log, "ab")  # noqa: SIM115 (the child has its own copy; ours is closed below)
    with stop.starting():
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "collapse_tui", *argv],
                start_new_session=True,
                env={**os.environ, **env, STOP_WITH: str(os.getpid())},
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
            )
        finally:
            if output is not None:
                output.close()
        stop.adopt(child)
    return child


def _earlier_runs(sweep_dir: Path, plan: list[PlannedRun]) -> list[str]:
    """The runs ``sweep.json`` names; a sweep of other settings (another --block, say) is refused,
    unless none of its runs got as far as a folder (each failed to start): then there are none."""
    try:
        data = json.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise UserError(
            f"{sweep_dir / SWEEP_FILE} cannot be read ({error}); give the sweep another --out"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{sweep_dir / SWEEP_FILE} is not a sweep's; give the sweep another --out")
    names = [str(name) for name in data.get("runs") or [] if isinstance(name, str)]
    if not any((sweep_dir / name).exists() for name in names):
        return []  # none of its runs got as far as a folder (each failed to start): nothing to keep alike
    difference = _first_difference(data.get("settings") or {}, _settings(plan))
    if difference:
        raise UserError(f"the sweep in {sweep_dir} has {difference}; {SAME_SETTINGS}")
    return names


def _settings(plan: list[PlannedRun]) -> dict[str, Any]:
    """What every run of the sweep computes alike: its configuration but the swept values (and what a
    resume may change)."""
    return {k: v for k, v in plan[0].config.to_dict().items() if k not in SWEPT and k not in NOT_COMPARED}


def _write_sweep_file(sweep_dir: Path, plan: list[PlannedRun], earlier: list[str], again: str) -> None:
    """``sweep.json``: the settings all runs share, every run given so far, and each command that gave them."""
    try:
        commands = json.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8")).get("commands") or []
    except (OSError, ValueError, AttributeError):
        commands = []
    data = {
        "settings": _settings(plan),
        "runs": [*earlier, *(run.name for run in plan if run.name not in earlier)],
        "commands": [*(c for c in commands if c != again), again],
        "written": time.time(),
    }
    write_atomic(sweep_dir / SWEEP_FILE, json.dumps(data, indent=2) + "\n")


def _show_results(names: list[str], sweep_dir: Path) -> None:
    """The figure of the sweep's runs (every run it was given, in order), then their ``runs`` table.

    The figure first: a table that cannot be printed (a pipe closed by ``| head``, a terminal gone)
    must not cost it.
    """
    from rich.console import Console

    from collapse_tui.plot import plot_runs

    runs = []
    for name in names:
        with contextlib.suppress(UserError, OSError):
            if is_run_folder(sweep_dir / name):
                runs.append(read_run(sweep_dir / name))
    drawn = [run.root for run in runs if run.records]
    if drawn:
        try:
            plot_runs(drawn, sweep_dir / FIGURE)
        except UserError as error:
            say(f"sweep: no figure: {error}")
        else:
            say(f"sweep: wrote {sweep_dir / FIGURE}")
    if runs:
        try:
            print_table(Console(), runs_table(runs, title=str(sweep_dir)))
        except (OSError, ValueError, SystemExit):  # rich exits on a broken pipe
            stop_writing_stdout()


def say(line: str) -> None:
    """One line of the sweep's own, if something still reads it (a closed pipe, a terminal gone: never mind)."""
    try:
        print(line, flush=True)
    except (OSError, ValueError):
        stop_writing_stdout()
