"""The command line: ``collapse-tui`` (live TUI) and ``collapse-tui headless``.

Both take the same run options, defined once in ``RUN_OPTIONS`` and attached
to each command by ``with_run_options`` (typer reads a callback's options only
before a subcommand's name, so each command must declare them). Errors a user
can cause print one line on stderr and exit 2; the headless path never
imports textual.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from collapse_tui.config import (
    DEFAULT_RUNS_ROOT,
    HUB_SETS,
    RESUME_MAY_CHANGE,
    RunConfig,
    absolute_eval,
    absolute_paths,
    check_collapse_threshold,
    check_config_types,
    eval_set_name,
    option_flag,
    parse_eval_tokens,
    refuse_empty,
    resolve_config,
    validate,
)
from collapse_tui.errors import UserError
from collapse_tui.exits import (
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    EXIT_USER_ERROR,
    closing_line,
    run_exit_code,
    stop_with_parent,
)
from collapse_tui.runfolder import CONFIG, read_summary, replaced_snapshot, snapshot_iteration

#: click's UsageError as typer raises it (recent typer vendors click, older typer imports it).
USAGE_ERROR: type[Exception] = typer.BadParameter.__bases__[0]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help=(
        "Watch a language model collapse as it trains on its own output (Herel & Mikolov 2024).\n\n"
        "With no command, the run goes on in the live screen (collapse-tui --model gpt2-medium); "
        "'headless' runs it without one."
    ),
)


_METAVARS = {str: "TEXT", int: "INT", float: "FLOAT", Path: "PATH", bool: None}


def _option(
    name: str, annotation: Any, help: str, *flags: str, metavar: str | None = None
) -> inspect.Parameter:
    base = annotation.__args__[0]  # X | None → X
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            annotation,
            typer.Option(
                *flags, help=help, show_default=False, metavar=metavar or _METAVARS.get(base, "SET")
            ),
        ],
    )


#: The run options of DESIGN section 3, shared by the TUI and headless commands.
#: All default to None ("not given"), so a preset can fill them and the user's wins.
RUN_OPTIONS: list[inspect.Parameter] = [
    _option("model", str | None, "Hub id or local model folder [default: gpt2].", "--model"),
    _option(
        "evals",
        list[str] | None,
        "Evaluation set, repeatable: wikitext-2, wikitext-2-v1, ptb, or a text file (each name once) [default: wikitext-2].",
        "--eval",
    ),
    _option("lr", float | None, "Learning rate of the constant-rate AdamW step [default: 4e-5].", "--lr"),
    _option("max_iters", int | None, "Iterations to run at most [default: 1000].", "--max-iters"),
    _option(
        "gen_tokens",
        int | None,
        "Tokens generated per iteration, from --block - 1 to 1,000,000 [default: 1024].",
        "--gen-tokens",
    ),
    _option("block", int | None, "Context window in tokens [default: 100].", "--block"),
    _option("top_k", int | None, "Sample from the k most likely tokens [default: 200].", "--top-k"),
    _option(
        "temperature",
        float | None,
        "Sampling temperature, from 0.001 to 1e6 [default: 1.0].",
        "--temperature",
    ),
    _option(
        "prompt",
        str | None,
        "Text generation starts from [default: a newline, which bash types as $'\\n'].",
        "--prompt",
    ),
    _option(
        "eval_tokens", str | None, "Validation tokens per set, or 'all' [default: 12800].", "--eval-tokens"
    ),
    _option("seed", int | None, "Random seed [default: 1337].", "--seed"),
    _option("device", str | None, "auto, cpu, cuda or cuda:N [default: auto].", "--device"),
    _option(
        "dtype", str | None, "auto (bf16 autocast on CUDA), float32 or bfloat16 [default: auto].", "--dtype"
    ),
    # str, not Path: typer makes an empty value (an unset shell variable) Path("."), the folder the
    # command was given in; config.refuse_empty refuses it
    _option("out", str | None, "Run folder [default: runs/<time>-<model>-lr<lr>/].", "--out", metavar="PATH"),
    _option(
        "preset",
        str | None,
        "Start from a preset: 'paper' (the paper's released configuration; options given win).",
        "--preset",
    ),
    _option(
        "collapse_threshold",
        float | None,
        "rep4 at or above this (below 1) counts towards collapse [default: 0.9].",
        "--collapse-threshold",
    ),
    _option(
        "collapse_patience",
        int | None,
        "Iterations in a row above the threshold that make a collapse [default: 3].",
        "--collapse-patience",
    ),
    _option(
        "keep_going",
        bool | None,
        "Keep iterating after the output has collapsed [default: stop at collapse].",
        "--keep-going/--stop-at-collapse",
    ),
    _option(
        "snapshot_every",
        int | None,
        "Also save a snapshot every N iterations; 0: none on the way [default: 0].",
        "--snapshot-every",
    ),
    _option(
        "final_snapshot",
        bool | None,
        "Save a snapshot when the run ends, so it can be resumed or inspected [default: on].",
        "--final-snapshot/--no-final-snapshot",
    ),
    _option(
        "resume",
        str | None,
        "Continue a run from one of its snapshots (snapshots/iter-N).",
        "--resume",
        metavar="PATH",
    ),
    _option(
        "train_on",
        str | None,
        "What gen_loss and the training step read: 'text' (the sample decoded and tokenized again, "
        "as the paper's code does) or 'ids' (the sampled ids) [default: text].",
        "--train-on",
    ),
]


def _swept(option: inspect.Parameter) -> inspect.Parameter:
    """A run option as ``sweep`` takes it: the swept ones repeatable, ``--out`` the sweep's folder."""
    from collapse_tui.sweep import REPEATABLE, SWEPT

    annotation, info = option.annotation.__origin__, option.annotation.__metadata__[0]
    if option.name in REPEATABLE:
        each = (
            "one run for each value"
            if option.name in SWEPT
            else "as many runs at once, each on one device given (their output in SWEEP/logs/)"
        )
        help = info.help.replace(" [default", f"; repeatable, {each} [default")
        one = annotation.__args__[0]
        return _option(option.name, list[one] | None, help, *info.param_decls, metavar=_METAVARS[one])
    if option.name == "out":
        return _option(
            "out",
            str | None,
            "The sweep's folder [default: runs/sweep-<time>/, with -2, -3, … where taken].",
            "--out",
            metavar="PATH",
        )
    return option


def with_run_options(
    command: Callable[..., Any], options: list[inspect.Parameter] = RUN_OPTIONS
) -> Callable[..., Any]:
    """Give a command every run option; the options reach it as keyword arguments."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=own + options)  # type: ignore[attr-defined]
    return command


def with_sweep_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the run options as ``sweep`` takes them (no ``--resume``: it resumes by itself)."""
    return with_run_options(command, [_swept(option) for option in RUN_OPTIONS if option.name != "resume"])


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ``UserError`` into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            typer.echo(f"collapse-tui: error: {error}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        # a path typed with a part the filesystem cannot take, wherever it is looked at
        except OSError as error:
            if error.errno != errno.ENAMETOOLONG:
                raise
            name = str(error.filename or "")
            shown = name if len(name) <= 80 else f"{name[:40]}…{name[-30:]}"
            typer.echo(f"collapse-tui: error: a path given is too long for the filesystem: {shown}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return guarded


def build_config(options: dict[str, Any]) -> RunConfig:
    """Resolve options into a config; with --resume, the run's own config is the base."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    refuse_empty(options)
    resume = options.get("resume")
    if resume:
        base = _run_config_of_snapshot(Path(resume))
        given = {k: v for k, v in options.items() if v is not None and v != [] and k != "resume"}
        if "preset" in given:
            raise UserError(
                "--preset cannot be given with --resume: a resumed run keeps its own configuration"
            )
        if "eval_tokens" in given:
            given["eval_tokens"] = parse_eval_tokens(given["eval_tokens"])
        if "evals" in given:
            given["evals"] = [absolute_eval(str(spec)) for spec in given["evals"]]
        for key, value in given.items():
            if (
                key not in RESUME_MAY_CHANGE
                and value != getattr(base, key, value)
                and not _moved(key, value, base)
                and not _same_path(key, value, base, Path(resume).parent.parent)
            ):
                flag = option_flag(key)
                # a default-named run's out is None: its folder is the snapshot's run's
                used = str(Path(resume).parent.parent) if key == "out" else repr(getattr(base, key))
                raise UserError(
                    f"{flag} cannot change when resuming (the run used {used}); start a new run instead"
                )
        if "evals" not in given:
            _check_eval_files_still_there(base.evals)
        if "device" not in given:
            _check_kept_device(base.device)
        # lr is applied by the engine after the snapshot's own lr is restored (see resume_lr).
        config = RunConfig.from_dict(
            absolute_paths({**base.to_dict(), **given, "lr": base.lr, "resume": resume})
        )
        validate(config, new_run=False)
        if "collapse_threshold" in given:  # the leniency is for the run's own setting, not one given now
            check_collapse_threshold(given["collapse_threshold"])
        if "lr" in given:
            validate(dataclasses.replace(config, lr=given["lr"]), new_run=False)
        reached = snapshot_iteration(Path(resume))
        if reached is not None and config.max_iters <= reached:
            from collapse_tui.engine import records_on_current_branch

            # a snapshot of an abandoned branch is refused for that first: a larger --max-iters would not do
            records_on_current_branch(Path(resume), Path(resume).parent.parent)
            raise UserError(
                f"--max-iters {config.max_iters}: the snapshot is at iteration {reached} already; "
                "give a larger --max-iters to go on"
            )
        return config
    return resolve_config(options)


def _check_eval_files_still_there(evals: list[str]) -> None:
    """A resumed run's evaluation files, moved since it started, are given anew with ``--eval``: say so."""
    gone = [spec for spec in evals if spec not in HUB_SETS and not Path(spec).exists()]
    if gone:
        given_anew = " ".join(f"--eval {'NEW_PATH' if spec in gone else spec}" for spec in evals)
        raise UserError(
            f"--resume: the run's evaluation file {gone[0]} is not there any more; "
            f"if it moved, give its new path (named {eval_set_name(gone[0])}.*, as the set is known by its name), "
            f"the sets in the run's order: {given_anew}"
        )


def _moved(key: str, value: Any, base: RunConfig) -> bool:
    """Whether ``--eval`` names the run's own evaluation files at another path (the same sets, moved)."""
    if key != "evals" or len(value) != len(base.evals):
        return False

    def same(new: str, was: str) -> bool:
        if new in HUB_SETS or was in HUB_SETS:  # a hub set is not a file that can move, nor stands in for one
            return new == was
        # the same name, or the very file (a link to what an earlier version stored resolved)
        return eval_set_name(new) == eval_set_name(was) or os.path.realpath(new) == os.path.realpath(was)

    # the engine checks, once loaded, that the files hold the same text (Engine._check_same_eval_sets)
    return all(same(new, was) for new, was in zip(value, base.evals, strict=True))


def _same_path(key: str, value: Any, base: RunConfig, run_dir: Path) -> bool:
    """Whether ``--model`` names the run's model folder, or ``--out`` the folder of the snapshot resumed,
    spelled another way (./tiny for tiny). A default-named run has no ``out`` of its own."""
    if key not in ("model", "out") or not isinstance(value, str):
        return False
    was = str(run_dir if key == "out" else base.model)
    if os.path.normpath(value) == os.path.normpath(was):
        return True
    return Path(value).exists() and Path(was).exists() and Path(value).resolve() == Path(was).resolve()


def resume_lr(options: dict[str, Any]) -> float | None:
    """A learning rate given together with --resume: it overrides the snapshot's."""
    return options.get("lr") if options.get("resume") else None


def _check_kept_device(device: str) -> None:
    """A resume keeps the run's ``--device``: one this machine lacks (``cuda:1`` under a scheduler that
    shows one GPU, a CUDA run resumed on a laptop) is named as the run's, with the way out. It said
    "--device cuda:1: there is no such CUDA device" to someone who had typed no --device."""
    if device in ("auto", "cpu"):
        return
    import torch  # only for a run that named a device

    from collapse_tui.modeling import resolve_device

    try:
        if torch.device(device).type != "cuda":
            return  # not a CUDA device (a config.json edited by hand): the engine's resolve_device says so
    except (RuntimeError, ValueError):
        return
    try:
        resolve_device(device)
    except UserError:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(
                f"the run used --device {device}, and no CUDA device is available here; "
                "give --device cpu to resume it here"
            ) from None
        raise UserError(
            f"the run used --device {device}, and this machine has {count} CUDA device{'s' * (count > 1)}; "
            "give --device cuda (or cuda:N, cpu) to resume it here"
        ) from None


def _run_config_of_snapshot(snapshot: Path) -> RunConfig:
    config_path = snapshot.parent.parent / CONFIG
    if (snapshot / CONFIG).is_file() and (snapshot / "snapshots").is_dir():  # a run folder, not a snapshot
        # the run's own word: the highest iter-N may be of a branch a resume abandoned
        newest = read_summary(snapshot) or {}
        hint = f"; its newest is {newest['last_snapshot']}" if newest.get("last_snapshot") else ""
        raise UserError(
            f"--resume takes a snapshot of a run (RUN/snapshots/iter-N), not the run {snapshot}{hint}"
        )
    if not snapshot.exists() and not replaced_snapshot(snapshot).exists():  # that one the engine puts back
        raise UserError(f"--resume {snapshot}: there is no such folder")
    if not config_path.exists():
        if snapshot.parent.name == "snapshots":  # the shape is right: the run's own config is what is gone
            raise UserError(
                f"--resume {snapshot}: its run's config.json ({config_path}) is not there; "
                "a snapshot is resumed in its run's folder, which keeps the run's settings"
            )
        raise UserError(
            f"--resume {snapshot}: not a snapshot folder of a run (expected RUN/snapshots/iter-N)"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
        check_config_types(data)
        return RunConfig.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise UserError(f"{config_path} is not a valid run config: {error}") from None
    except OSError as error:
        raise UserError(f"{config_path} cannot be read: {error.strerror}") from None


#: The commands that take run options given before their name (``collapse-tui --lr 1e-4 headless``).
TAKE_RUN_OPTIONS = ("headless", "sweep")


@app.callback(invoke_without_command=True)
@user_errors
@with_run_options
def main_command(ctx: typer.Context, **options: Any) -> None:
    """Run the self-training loop in the live terminal UI."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {k: v for k, v in options.items() if v is not None and v != []}
        if ctx.obj and ctx.invoked_subcommand not in TAKE_RUN_OPTIONS:  # else dropped without a word
            flags = ", ".join(option_flag(key, value) for key, value in ctx.obj.items())
            raise UserError(
                f"{flags}: run options go with collapse-tui, collapse-tui headless or collapse-tui sweep, "
                f"not with {ctx.invoked_subcommand}"
            )
        return
    config = build_config(options)
    from collapse_tui.tui.app import need_terminal, run_app  # here: the headless path never loads textual

    need_terminal("run it with `collapse-tui headless`")  # before a folder is made, or a run's is touched
    from collapse_tui.engine import Engine
    from collapse_tui.follow import serving_watchers

    engine = Engine(config, resume_lr=resume_lr(options))
    try:
        with serving_watchers(
            engine.run_dir,
            engine.controls,
            made=engine.made_dirs,
            left_as_it_stood=lambda: engine.left_as_it_stood,
        ):
            summary = run_app(engine)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as error:  # a crash, not a mistake: one line, the traceback kept in a file
        from collapse_tui.crash import report_crash

        report_crash(error, engine.run_dir, go_on_from=engine.go_on_from)
        raise typer.Exit(EXIT_RUN_FAILED) from None
    if Path(engine.run_dir, CONFIG).is_file():  # the screen is gone: say where the run is
        typer.echo(f"collapse-tui: the run is in {engine.run_dir}")
    line = closing_line(summary)
    if line:
        typer.echo(line, err=True)
    raise typer.Exit(run_exit_code(summary, signalled=bool(summary.get("signal"))))


def refuse_given_twice(
    before: dict[str, Any], after: dict[str, Any], keys: tuple[str, ...], command: str
) -> None:
    """An option a command takes several values of, given both before and after its name: the values
    would add up (``--eval a headless --eval b``), but those before were dropped without a word."""
    both = [key for key in keys if before.get(key) not in (None, []) and after.get(key) not in (None, [])]
    if both:
        flag = option_flag(both[0])
        raise UserError(
            f"{flag} is given both before and after '{command}'; give all its values after it "
            f"({flag} A {flag} B)"
        )


@app.command("headless")
@user_errors
@with_run_options
def headless_command(ctx: typer.Context, **options: Any) -> None:
    """Run the same loop with no UI: a progress bar on a terminal, plain lines otherwise."""
    given_before = ctx.obj or {}
    refuse_given_twice(given_before, options, ("evals",), "headless")
    merged = {**options, **{k: v for k, v in given_before.items() if options.get(k) in (None, [])}}
    config = build_config(merged)
    from collapse_tui.headless import run_headless

    raise typer.Exit(run_headless(config, resume_lr=resume_lr(merged)))


@app.command("sweep")
@user_errors
@with_sweep_options
def sweep_command(ctx: typer.Context, **options: Any) -> None:
    """Run one headless run for each --model, --lr and --seed given: in turn, or several at once with --device given more than once."""
    from collapse_tui.sweep import REPEATABLE, run_sweep

    if (ctx.obj or {}).get("resume"):
        raise UserError(
            "--resume goes with collapse-tui or collapse-tui headless; a sweep goes on by itself "
            "when given the same command (and --out) again"
        )
    refuse_given_twice(ctx.obj or {}, options, (*REPEATABLE, "evals"), "sweep")
    given_before = {  # run options before "sweep" are one value each
        k: [v] if k in REPEATABLE else v for k, v in (ctx.obj or {}).items() if options.get(k) in (None, [])
    }
    merged = {**options, **given_before}
    refuse_empty(merged)
    out = merged.pop("out")
    raise typer.Exit(run_sweep(merged, None if out is None else Path(out)))


@app.command("watch")
@user_errors
def watch_command(
    run_dir: Annotated[
        Path, typer.Argument(help="The run folder to show.", show_default=False, metavar="RUN_DIR")
    ],
    read_only: Annotated[bool, typer.Option("--read-only", help="Show the run without steering it.")] = False,
) -> None:
    """Attach the TUI to a run folder: follow a live run (and steer it), or replay a finished one."""
    from collapse_tui.follow import FolderSource, is_alive, wait_until_started
    from collapse_tui.tui.app import need_terminal, run_app

    need_terminal("read the run with `collapse-tui runs` or `collapse-tui plot`")

    def waiting() -> None:
        if is_alive(run_dir):
            typer.echo(f"collapse-tui: waiting for the run in {run_dir} to start (it is loading)…", err=True)
        else:
            typer.echo(
                f"collapse-tui: no run in {run_dir} yet; waiting a few seconds for one starting there…",
                err=True,
            )

    wait_until_started(run_dir, waiting=waiting)
    if not (run_dir / CONFIG).exists() and is_alive(run_dir) is False:
        raise UserError(
            f"the run in {run_dir} ended before it started (its process is gone; see its own output)"
        )
    source = FolderSource(run_dir, read_only=read_only)
    try:
        summary = run_app(source)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as error:  # a crash of the watcher: one line; the traceback not in the run's folder
        from collapse_tui.crash import report_crash

        report_crash(error, None, watching=True)
        raise typer.Exit(EXIT_RUN_FAILED) from None
    if summary.get("reason") == "watcher detached" and source.controls.paused:
        # quitting a watcher leaves the run as it is: say so where that means it waits for good
        typer.echo(
            f"collapse-tui: the run in {run_dir} is paused and waits; "
            f"to go on: collapse-tui watch {run_dir}, then space"
        )


@app.command("plot")
@user_errors
def plot_command(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders to compare; a folder of runs (a sweep) stands for every run in it.",
            show_default=False,
            metavar="RUN_DIR",
        ),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Figure file (.png, .pdf, .svg).")] = Path(
        "collapse.png"
    ),
    csv: Annotated[
        Path | None, typer.Option("--csv", help="Also write the merged per-iteration metrics.")
    ] = None,
) -> None:
    """Plot validation loss and loss on generated text against iteration, one line per run."""
    from collapse_tui.plot import plot_runs

    for reason in plot_runs(run_dirs, out, csv):
        typer.echo(f"collapse-tui: left out: {reason}", err=True)
    typer.echo(f"wrote {out}" + (f" and {csv}" if csv else ""))


@app.command("runs")
@user_errors
def runs_command(
    root: Annotated[
        Path, typer.Argument(help="Folder holding run folders.", metavar="ROOT")
    ] = DEFAULT_RUNS_ROOT,
) -> None:
    """List the runs under a folder: model, lr, iterations, collapse, losses, status."""
    from rich.console import Console
    from rich.text import Text

    from collapse_tui.runs import find_runs, runs_table
    from collapse_tui.tables import print_table

    if not root.is_dir():
        where = " (runs are listed from ./runs unless given a folder: collapse-tui runs FOLDER)"
        what = f"{root} is not a folder" if root.exists() else f"there is no folder {root}"
        raise UserError(what + (where if root == DEFAULT_RUNS_ROOT else ""))
    skipped: list[str] = []
    runs = find_runs(root, skipped=skipped)
    console = Console()
    if not runs:
        console.print(Text(f"no runs under {root}"))
    else:
        print_table(console, runs_table(runs, title=str(root)))
    for line in skipped:
        console.print(Text(line, style="dim"))


def main() -> None:
    """Console-script entry point.

    A mistyped option or value gets one line, like every other user error
    (click's own message, without its usage block), and exit code 2.
    """
    stop_with_parent()  # a sweep's run: first, before torch loads (seconds in which a Ctrl-Z may stop it)
    try:
        code = app(standalone_mode=False, prog_name="collapse-tui")  # also as python -m, or a sweep's run
    except USAGE_ERROR as error:
        ctx = getattr(error, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        typer.echo(f"collapse-tui: error: {error.format_message()}{hint}", err=True)  # type: ignore[attr-defined]
        sys.exit(EXIT_USER_ERROR)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
