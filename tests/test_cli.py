"""The command line end to end: typer's CliRunner, and real subprocesses for exit codes and messages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from runfolders import make_run
from signals import wait_until_catching, wait_until_ignoring
from typer.testing import CliRunner

from collapse_tui.cli import app
from collapse_tui.runfolder import read_run

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def screens_have_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests that stand in for the screen (``run_app`` patched) run it from CliRunner, whose process
    may have no terminal (CI): the live screen's own check is tested through a subprocess below."""
    monkeypatch.setattr("collapse_tui.tui.app.need_terminal", lambda instead: None)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collapse_tui.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def small_run(model: Path, evalfile: Path, out: Path, *extra: str) -> list[str]:
    return [
        "headless", "--model", str(model), "--eval", str(evalfile), "--max-iters", "5",
        "--gen-tokens", "64", "--block", "32", "--out", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip


def test_headless_runs_and_leaves_a_complete_run_folder(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path
):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, small_run(tiny_model_dir, eval_file, out))
    assert result.exit_code == 0, result.output
    assert "it 5/5" in result.output
    assert "finished" in result.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3, 4]
    first = json.loads(lines[0])
    for key in ["lr", "gen_loss", "valid", "rep4", "distinct1", "unique_tokens", "compression_ratio",
                "collapsed", "seconds", "text"]:  # fmt: skip
        assert key in first
    assert set(first["valid"]) == {"heldout"}
    config = json.loads((out / "config.json").read_text())
    assert config["block"] == 32 and config["versions"]["torch"]
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events == ["start", "snapshot", "stop"]  # the final snapshot: the run can go on from it
    assert json.loads((out / "snapshots" / "iter-5" / "state.json").read_text())["iteration"] == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 5
    # the run is over: a late Ctrl-C or kill ends the process at once with the run's exit code, no
    # traceback at its exit (test_a_ctrl_c_after_the_run_has_ended_keeps_its_exit_code)
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        assert getattr(handler, "__qualname__", "") == "_leave_at_once_with.<locals>.leave", handler
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # a terminal gone now changes nothing
    # the paths a resume takes are printed whole, even where the output has no width (a pipe, a file)
    table = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
             if line.count("│") == 3}  # fmt: skip
    assert table["last snapshot"] == summary["last_snapshot"] and table["run folder"] == summary["run_dir"]


def test_snapshot_every_and_no_final_snapshot(tiny_model_dir: Path, eval_file: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = [*small_run(tiny_model_dir, eval_file, out), "--snapshot-every", "2", "--no-final-snapshot"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["iter-2", "iter-4"]
    resumed = CliRunner().invoke(
        app, ["headless", "--resume", str(out / "snapshots" / "iter-4"), "--max-iters", "6"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["iter-2", "iter-4", "iter-6"]


def test_options_before_the_subcommand_reach_it(tiny_model_dir: Path, eval_file: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = small_run(tiny_model_dir, eval_file, out)
    result = CliRunner().invoke(app, ["--lr", "0.002", *args])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["lr"] == 0.002


def run_checking_textual_is_not_imported(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the command line with ``args`` in a fresh interpreter that then fails if textual was imported."""
    code = (
        "import sys; from collapse_tui.cli import app; "
        f"code = app({args!r}, standalone_mode=False); "
        "assert 'textual' not in sys.modules, 'textual was imported'; "
        "sys.exit(code or 0)"  # a command that stopped at once did not show it
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)


#: Sends this process a Ctrl-C as ``collapse_tui.cli`` starts importing typer: the second in which a
#: Ctrl-C pressed at once, or passed on by a sweep to a run it has just started, lands.
CTRL_C_WHILE_LOADING = """
import importlib.abc, os, signal, sys

class CtrlCOnTyper(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "typer":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCOnTyper())
sys.argv = ["collapse-tui", "--help"]
from collapse_tui.__main__ import main
main()
"""


def test_a_ctrl_c_while_the_command_line_loads_ends_it_quietly_as_an_interruption() -> None:
    """It printed KeyboardInterrupt's traceback from inside an import (before ``cli.main`` could catch it)."""
    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_LOADING], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert (result.returncode, result.stderr) == (130, "")


def test_python_m_collapse_tui_is_the_command(tmp_path: Path) -> None:
    """What a sweep starts each run with; its messages name the command as users type it."""
    result = subprocess.run(
        [sys.executable, "-m", "collapse_tui", "headless", "--lr", "abc"],
        capture_output=True, text=True, env=ENV, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("collapse-tui: error: Invalid value for '--lr'")
    assert "(see collapse-tui headless --help)" in result.stderr


def test_headless_does_not_import_textual(tiny_model_dir: Path, eval_file: Path, tmp_path: Path):
    result = run_checking_textual_is_not_imported(small_run(tiny_model_dir, eval_file, tmp_path / "run"))
    assert result.returncode == 0, result.stderr


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert "error:" not in result.stdout, result.stdout  # said once, on stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("collapse-tui: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--lr", "0"], ["--lr"]),
        (["--lr", "-1e-4"], ["--lr"]),
        (["--block", "1"], ["--block"]),
        (["--gen-tokens", "8"], ["--gen-tokens"]),
        (["--eval-tokens", "many"], ["--eval-tokens"]),
        (["--device", "cuda"], ["CUDA"]),
        (["--block", "500", "--gen-tokens", "600"], ["--block", "context"]),
    ],
)
def test_bad_numbers_get_one_line_and_exit_2(tiny_model_dir, eval_file, tmp_path, extra, fragments):
    assert_one_line_error(cli(*small_run(tiny_model_dir, eval_file, tmp_path / "run"), *extra), *fragments)


@pytest.mark.parametrize(
    "args",
    [["headless", "--out="], ["headless", "--resume", ""], ["headless", "--model", ""], ["headless", "--eval="],
     ["sweep", "--out="], ["sweep", "--model="], ["--out=", "headless"]],
)  # fmt: skip
def test_an_empty_path_or_model_is_refused_not_taken_for_the_folder_here(args, tmp_path, monkeypatch) -> None:
    """``--out "$RUN"`` with RUN unset wrote a run into the folder the command was given in."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "is empty (an unset shell variable?)" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_while_offline(eval_file: Path, tmp_path: Path):
    result = cli(*small_run(Path("no-such-org/no-such-model"), eval_file, tmp_path / "run"))
    assert_one_line_error(result, "no-such-org/no-such-model")


def test_model_folder_without_config(eval_file: Path, tmp_path: Path):
    (tmp_path / "empty-model").mkdir()
    assert_one_line_error(
        cli(*small_run(tmp_path / "empty-model", eval_file, tmp_path / "run")), "config.json"
    )


def test_a_model_folder_without_tokenizer_files(tiny_model_dir: Path, eval_file: Path, tmp_path: Path):
    (tmp_path / "weights-only").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, tmp_path / "weights-only" / name)
    result = cli(*small_run(tmp_path / "weights-only", eval_file, tmp_path / "run"))
    assert_one_line_error(result, "no usable tokenizer")


def test_a_model_that_is_not_a_causal_lm(eval_file: Path, tmp_path: Path):
    from transformers import BertConfig, ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    assert_one_line_error(
        cli(*small_run(tmp_path / "vit", eval_file, tmp_path / "run")), "not a causal language model"
    )
    # a masked LM: transformers loads it into BertLMHeadModel without a word, bidirectional (it ran)
    BertConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path / "bert")
    assert_one_line_error(
        cli(*small_run(tmp_path / "bert", eval_file, tmp_path / "run")), "an encoder: each position sees"
    )
    assert not (tmp_path / "run").exists()


def test_encoders_and_seq2seq_models_are_not_causal_lms_but_their_decoder_variants_are() -> None:
    from transformers import BartConfig, BertConfig, GPT2Config, LlamaConfig, RobertaConfig, T5Config

    from collapse_tui.modeling import _is_causal_lm

    assert _is_causal_lm(GPT2Config()) and _is_causal_lm(LlamaConfig())
    assert _is_causal_lm(BertConfig(is_decoder=True)) and _is_causal_lm(RobertaConfig(is_decoder=True))
    assert not _is_causal_lm(BertConfig()) and not _is_causal_lm(RobertaConfig())
    assert not _is_causal_lm(BartConfig()) and not _is_causal_lm(T5Config())


def test_missing_and_empty_evaluation_files(tiny_model_dir: Path, tmp_path: Path):
    missing = cli(*small_run(tiny_model_dir, tmp_path / "nope.txt", tmp_path / "run"))
    assert_one_line_error(missing, "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    assert_one_line_error(cli(*small_run(tiny_model_dir, tmp_path / "empty.txt", tmp_path / "run")), "empty")


def test_a_run_folder_that_already_holds_a_run(tiny_model_dir: Path, eval_file: Path, tmp_path: Path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"model": "gpt2", "run_dir": "run"}')
    (tmp_path / "run" / "metrics.jsonl").write_text('{"iteration": 0}\n')
    assert_one_line_error(cli(*small_run(tiny_model_dir, eval_file, tmp_path / "run")), "already holds a run")
    assert not (tmp_path / "run" / "process.json").exists()  # refused before it announced itself there


def test_out_naming_a_file_says_so(tiny_model_dir: Path, eval_file: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    result = cli(*small_run(tiny_model_dir, eval_file, tmp_path / "notes.txt"))
    assert_one_line_error(result, "is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_second_start_into_a_live_run_folder_leaves_the_first_runs_files_alone(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path
):
    out = tmp_path / "run"
    args = small_run(tiny_model_dir, eval_file, out)
    args[args.index("--max-iters") + 1] = "100000"
    first = subprocess.Popen([sys.executable, "-m", "collapse_tui.cli", *args], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            assert time.monotonic() < deadline and first.poll() is None, "the first run did no iteration"
            time.sleep(0.2)
        assert_one_line_error(cli(*args), "holds a run that another process is writing now")
        process = json.loads((out / "process.json").read_text())
        assert process["pid"] == first.pid and process["state"] == "running"
        assert (out / ".lock").exists()
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)


def test_a_run_folder_left_before_its_first_iteration_is_used_again(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "gpt2", "run_dir": str(out)}))
    (out / "events.jsonl").write_text(
        '{"event": "start", "iteration": 0}\n{"event": "stop", "iteration": 0}\n'
    )
    result = CliRunner().invoke(app, small_run(tiny_model_dir, eval_file, out, "--max-iters", "1"))
    assert result.exit_code == 0, result.output
    run = read_run(out)
    assert run.config["model"] == str(tiny_model_dir)
    assert [r.iteration for r in run.records] == [0]
    assert [e.event for e in run.events].count("start") == 1


def run_patched_cli(script: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, with ``script`` (which patches the code, then calls ``main``)."""
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV, timeout=300
    )


#: Runs the CLI with Engine.step raising at iteration 2, as a bug deep in a run would.
CRASHING_CLI = """
import sys
from collapse_tui import engine
from collapse_tui.cli import main

real_step = engine.Engine.step

def step(self):
    if self.iteration == 2:
        raise RuntimeError("boom in step\\nsecond line of the message")
    return real_step(self)

engine.Engine.step = step
sys.argv = ["collapse-tui", *sys.argv[1:]]
main()
"""


#: Runs the CLI with a SIGTERM while the model loads, and another as the process cleans up: a
#: scheduler's, then the sweep's own passed on.
KILLED_TWICE_WHILE_LOADING_CLI = """
import os, signal, sys
from collapse_tui import engine, follow
from collapse_tui.cli import main

def load(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)

real_close = follow.RunProcess.close

def close(self):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_close(self)

engine.Engine.load = load
follow.RunProcess.close = close
sys.argv = ["collapse-tui", *sys.argv[1:]]
main()
"""


def test_a_second_sigterm_while_leaving_a_load_changes_nothing(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "run"
    result = run_patched_cli(KILLED_TWICE_WHILE_LOADING_CLI, small_run(tiny_model_dir, eval_file, out))
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "collapse-tui: interrupted while loading"
    assert not out.exists()  # the folder it made, cleaned up whole: no lock, no "running" process.json


def test_a_crash_gets_one_line_naming_the_run_folder_and_its_traceback_file(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path
):
    out = tmp_path / "run"
    result = run_patched_cli(CRASHING_CLI, small_run(tiny_model_dir, eval_file, out))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"collapse-tui: the run crashed: RuntimeError: boom in step; its data is kept in {out}; "
        f"traceback in {out / 'traceback.txt'}"
    ]
    assert (
        "boom in step" in (out / "traceback.txt").read_text()
        and "Traceback" in (out / "traceback.txt").read_text()
    )
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # iterations 0 and 1 are kept
    assert json.loads((out / "summary.json").read_text())["status"] == "crashed"


def test_a_crash_before_the_run_used_its_folder_leaves_no_traceback_there(tmp_path: Path, capsys) -> None:
    # --out an existing folder, and a crash while loading: the folder stays as it was, usable again
    from collapse_tui.crash import report_crash
    from collapse_tui.runfolder import check_new_run_folder

    out = tmp_path / "out"
    out.mkdir()
    saved = report_crash(RuntimeError("boom while loading"), out)
    assert saved is not None and saved.parent != out and "boom while loading" in saved.read_text()
    assert list(out.iterdir()) == []
    check_new_run_folder(out)
    assert f"traceback in {saved}" in capsys.readouterr().err
    saved.unlink()


def test_a_folder_that_cannot_be_written_any_more_is_said_as_such_not_as_a_crash(
    tmp_path: Path, capsys
) -> None:
    """A full disk or a folder made read-only mid-run read "the run crashed", which the README keeps
    for bugs."""
    from collapse_tui.crash import report_crash

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    full = OSError(28, "No space left on device", str(out / ".summary.json.1.tmp"))
    saved = report_crash(full, out)
    line = capsys.readouterr().err.strip()
    assert line.startswith(
        f"collapse-tui: the run stopped: a file could not be written ({out / '.summary.json.1.tmp'}): "
        "No space left on device; free some space or mend the folder's permissions, then start it again"
    ), line
    assert "crashed" not in line and f"its data is kept in {out}" in line
    assert saved is not None and "No space left on device" in saved.read_text()
    assert "then start it again in a new folder (this one keeps its records)" in line  # no snapshot
    snapshot = out / "snapshots" / "iter-3"
    report_crash(full, out, go_on_from=(snapshot, 0))  # one to go on from, as far as the records go: say so
    assert f"then go on with --resume {snapshot}; its data is kept in" in capsys.readouterr().err


#: Runs the CLI with a Ctrl-C landing once the run has ended, while its summary is printed.
INTERRUPTED_AFTER_THE_END_CLI = """
import os, signal, sys, time
from collapse_tui import headless
from collapse_tui.cli import main

real_print_table = headless.print_table

def print_table(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)  # the handler runs on the next bytecode; a process killed by the signal never gets here
    return real_print_table(*args, **kwargs)

headless.print_table = print_table
sys.argv = ["collapse-tui", *sys.argv[1:]]
main()
"""


def test_a_ctrl_c_after_the_run_has_ended_keeps_its_exit_code(tiny_model_dir, eval_file, tmp_path):
    """The run finished (max_iters): a Ctrl-C in the moment before the process is gone must not make
    a script or a sweep take it for an interrupted run."""
    out = tmp_path / "run"
    result = run_patched_cli(INTERRUPTED_AFTER_THE_END_CLI, small_run(tiny_model_dir, eval_file, out))
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert json.loads((out / "summary.json").read_text())["reason"] == "max_iters"
    assert "Traceback" not in result.stderr


#: Runs the CLI in a folder that stops taking writes after iteration 1's snapshot (made read-only,
#: or a full disk): later snapshots fail and are logged, the run goes on, and its end cannot be written.
UNWRITABLE_AFTER_FIRST_SNAPSHOT_CLI = """
import sys
from collapse_tui import engine, runfolder
from collapse_tui.cli import main

real_snapshot = engine.Engine.snapshot

def snapshot(self, *args, **kwargs):
    if self.iteration > 1:
        raise PermissionError(13, "Permission denied", str(self.run_dir / "snapshots"))
    return real_snapshot(self, *args, **kwargs)

def write_summary(self, summary):
    raise PermissionError(13, "Permission denied", str(self.root / ".summary.json.1.tmp"))

engine.Engine.snapshot = snapshot
runfolder.RunWriter.write_summary = write_summary
sys.argv = ["collapse-tui", *sys.argv[1:]]
main()
"""


#: Runs the CLI with a resume whose run folder refuses its files (a colleague's metrics.jsonl, say).
RESUME_REFUSED_ITS_FILES_CLI = """
import sys
from collapse_tui import runfolder
from collapse_tui.cli import main

def refused(self, resuming):
    raise PermissionError(13, "Permission denied", str(self.root / "metrics.jsonl"))

runfolder.RunWriter._open = refused
sys.argv = ["collapse-tui", *sys.argv[1:]]
main()
"""


def test_a_resume_refused_its_files_is_told_to_resume_again_not_to_start_anew(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path
):
    """Before the resume has restored its snapshot the engine has none of its own to name: the line
    said to start again in a new folder, where mending the permissions and the same --resume do."""
    out = tmp_path / "run"
    assert CliRunner().invoke(app, small_run(tiny_model_dir, eval_file, out)).exit_code == 0
    snapshot = out / "snapshots" / "iter-5"
    result = run_patched_cli(
        RESUME_REFUSED_ITS_FILES_CLI, ["headless", "--resume", str(snapshot), "--max-iters", "7"]
    )
    assert result.returncode == 1, result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert f"mend the folder's permissions, then go on with --resume {snapshot}; its data is kept" in last, (
        last
    )


def test_after_a_write_fails_the_line_says_what_resuming_its_newest_snapshot_gives_up(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path
):
    """Snapshots 2 to 5 failed, the run went on to its end: iter-1 is four iterations behind the
    records. Resuming it, as the line used to advise plainly, hid those four from runs, plot and watch."""
    out = tmp_path / "run"
    result = run_patched_cli(
        UNWRITABLE_AFTER_FIRST_SNAPSHOT_CLI,
        small_run(tiny_model_dir, eval_file, out, "--snapshot-every", "1"),
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(
        f"collapse-tui: the run stopped: a file could not be written ({out / '.summary.json.1.tmp'}): "
        f"Permission denied; free some space or mend the folder's permissions, then go on with "
        f"--resume {out / 'snapshots' / 'iter-1'}, which gives up the 4 iterations recorded after it; "
        f"its data is kept in {out}"
    ), lines
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5


def test_a_watcher_that_crashes_says_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runfolders import make_run

    import collapse_tui.tui.app as tui_app
    from collapse_tui.errors import ScreenCrashed

    run_dir = make_run(tmp_path / "run", "running", n=2)

    def crashed_screen(source):
        raise ScreenCrashed(RuntimeError("a bug in a widget"))

    monkeypatch.setattr(tui_app, "run_app", crashed_screen)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its traceback goes
    result = CliRunner().invoke(app, ["watch", str(run_dir)])
    assert result.exit_code == 1
    assert (
        "collapse-tui: the watcher crashed (RuntimeError: a bug in a widget); the run goes on"
        in result.output
    )
    assert "Traceback" not in result.output and not (run_dir / "traceback.txt").exists()  # not the run's


def test_watching_a_start_that_died_while_loading_says_so(tmp_path: Path) -> None:
    from runfolders import dead_pid, write_process

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_process(run_dir, dead_pid())  # announced, then killed before its config
    result = CliRunner().invoke(app, ["watch", str(run_dir)])
    assert result.exit_code == 2
    assert f"the run in {run_dir} ended before it started (its process is gone" in result.output


def test_a_traceback_that_cannot_be_written_into_the_run_folder_leaves_no_empty_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collapse_tui.crash import report_crash

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    real_write_text = Path.write_text

    def full_disk(self: Path, text: str, *args, **kwargs):
        if self.name == "traceback.txt":
            real_write_text(self, "", encoding="utf-8")
            raise OSError(28, "No space left on device")
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    saved = report_crash(RuntimeError("boom"), tmp_path / "run")
    assert saved is not None and saved.parent == tmp_path  # in a temporary file instead
    assert not (tmp_path / "run" / "traceback.txt").exists()


def test_the_tui_command_reports_a_crash_in_one_line(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def crashed_run(engine):  # the run crashed, the user read the screen and pressed q
        (engine.run_dir / "config.json").write_text("{}")  # it had started: its folder is kept
        raise RuntimeError("CUDA exploded")

    monkeypatch.setattr("collapse_tui.tui.app.run_app", crashed_run)
    args = small_run(tiny_model_dir, eval_file, tmp_path / "run")[1:]  # no "headless": the TUI
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"collapse-tui: the run crashed: RuntimeError: CUDA exploded; its data is kept in {tmp_path / 'run'}"
    )
    assert "CUDA exploded" in (tmp_path / "run" / "traceback.txt").read_text()


def start_endless_headless(model: Path, eval_file: Path, out: Path, **popen: Any) -> subprocess.Popen:
    """A headless run with no end in sight, in its own process, once its first iteration is reported."""
    args = small_run(model, eval_file, out)
    args[args.index("--max-iters") + 1] = "100000"
    process = subprocess.Popen(
        [sys.executable, "-m", "collapse_tui.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **popen,
    )  # fmt: skip
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    for line in process.stdout:  # wait for the first iteration's line
        if line.startswith("it 1/") or time.monotonic() > deadline:
            break
    return process


def test_ctrl_c_stops_after_the_iteration_in_flight_and_exits_130(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "run"
    process = start_endless_headless(tiny_model_dir, eval_file, out)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("stopped", "SIGINT")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stop" and events[-1]["reason"] == "SIGINT"
    assert summary["iterations"] == len((out / "metrics.jsonl").read_text().splitlines())


def test_a_closed_output_pipe_stops_the_reporting_not_the_run(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "collapse_tui.cli", *small_run(tiny_model_dir, eval_file, out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:  # like `| head`: read until the first iteration, then go away
        if line.startswith("it 1/"):
            break
    process.stdout.close()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["iterations"] == 5
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5


def test_a_hang_up_that_comes_twice_still_stops_the_run_cleanly(tiny_model_dir, eval_file, tmp_path):
    # A dropped SSH session: the shell passes a SIGHUP on to its job, then the kernel sends its own.
    # The second is not a user's second Ctrl-C ("leave now"): the run still ends with its snapshot.
    out = tmp_path / "run"
    process = start_endless_headless(tiny_model_dir, eval_file, out)
    process.send_signal(signal.SIGHUP)
    wait_until_ignoring(process.pid, signal.SIGHUP, 5.0)  # handled: the second comes as a second
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("stopped", "SIGHUP")  # the run says what stopped it
    assert summary["last_snapshot"] and Path(summary["last_snapshot"], "state.json").exists()
    assert json.loads((out / "process.json").read_text())["state"] == "ended"


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_a_sigterm_while_the_run_stops_changes_nothing(tiny_model_dir, eval_file, tmp_path, first):
    # A scheduler (SLURM, systemd) signals every process of a job, a sweep's run among them, and the
    # sweep passes its own on too: a SIGTERM after the stop began must not cost the run its end.
    out = tmp_path / "run"
    process = start_endless_headless(tiny_model_dir, eval_file, out)
    process.send_signal(first)
    assert process.stdout is not None
    for line in process.stdout:  # the stop has begun: the final snapshot is being saved
        if line.startswith("[saving snapshot"):
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("stopped", first.name)
    assert summary["last_snapshot"] and Path(summary["last_snapshot"], "state.json").exists()


def test_kill_int_stops_a_background_job_whose_shell_ignored_sigint(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "run"
    process = start_endless_headless(  # `collapse-tui headless … &` in a script: SIGINT starts ignored
        tiny_model_dir, eval_file, out, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped"


#: The command's own entry, with the seconds before the run takes SIGINT (torch loading) held open
#: until the file named last on the command line exists: the test's kill -INT lands inside them.
HELD_OPEN_START = (
    "import os, sys, time\n"
    "import collapse_tui.cli as cli\n"
    "from collapse_tui.__main__ import main\n"
    "gate = sys.argv.pop()\n"
    "real = cli.main\n"
    "def held_open():\n"
    "    while not os.path.exists(gate):\n"
    "        time.sleep(0.02)\n"
    "    real()\n"
    "cli.main = held_open\n"
    "main()\n"
)


def test_kill_int_before_the_run_takes_sigint_still_stops_a_background_job(
    tiny_model_dir, eval_file, tmp_path
):
    """Where SIGINT starts ignored (a script's ``… &``), a kill -INT while it loads is kept, not lost."""
    out, gate = tmp_path / "run", tmp_path / "go"
    args = small_run(tiny_model_dir, eval_file, out)
    process = subprocess.Popen(
        [sys.executable, "-c", HELD_OPEN_START, *args, str(gate)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        assert wait_until_catching(process.pid, signal.SIGINT, 60.0), "SIGINT was never taken"
        process.send_signal(signal.SIGINT)
        gate.touch()
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # the test failed with the process still held open: end it
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not (out / "metrics.jsonl").exists()  # stopped before its first iteration, not after its last


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["headless", "--lr", "abc"], "Invalid value for '--lr'"),
        (["--bogus"], "No such option: --bogus"),
        (["headless", "--max-iters"], "'--max-iters' requires an argument"),
        (["plot"], "Missing argument 'RUN_DIR'"),  # as --help names it, not the Python parameter
        (["--lr", "1e-3", "runs", "."], "--lr: run options go with collapse-tui, collapse-tui headless"),
        (["--stop-at-collapse", "plot", "x"], "--stop-at-collapse: run options go with"),
        (["watch"], "Missing argument 'RUN_DIR'"),
    ],
)
def test_a_mistyped_option_gets_one_line_not_a_usage_block(args: list[str], fragment: str):
    assert_one_line_error(cli(*args), fragment)


def test_the_tui_command_says_where_the_run_is_once_the_screen_is_gone(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def finished_run(engine):
        (engine.run_dir / "config.json").write_text("{}")
        return {"status": "finished", "reason": "max_iters"}

    monkeypatch.setattr("collapse_tui.tui.app.run_app", finished_run)
    result = CliRunner().invoke(app, small_run(tiny_model_dir, eval_file, tmp_path / "run")[1:])
    assert result.exit_code == 0
    assert result.stdout == f"collapse-tui: the run is in {tmp_path / 'run'}\n"


def test_a_final_snapshot_that_cannot_be_written_fails_the_command(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("collapse_tui.engine.Engine._write_snapshot", disk_full)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, small_run(tiny_model_dir, eval_file, out))
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        "collapse-tui: the final snapshot could not be saved ([Errno 28] No space left on device); "
        "the run's records are kept, its last weights are not"
    ]
    assert "final snapshot" in result.stdout and "failed: [Errno 28]" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["last_snapshot"] is None
    assert "No space left on device" in summary["final_snapshot_failed"]


def test_the_summary_names_the_last_snapshot(tiny_model_dir: Path, eval_file: Path, tmp_path: Path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, small_run(tiny_model_dir, eval_file, out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_snapshot"] == str(out / "snapshots" / "iter-5")
    assert "final_snapshot_failed" not in summary
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stop" and summary["stopped"] == events[-1]["time"]
    assert "last snapshot" in result.stdout


def test_ctrl_c_while_a_finished_run_saves_its_end_keeps_exit_0(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from collapse_tui.engine import Engine

    final_snapshot = Engine._final_snapshot

    def interrupted_while_saving(self, status, reason):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, in the main thread
        final_snapshot(self, status, reason)

    monkeypatch.setattr(Engine, "_final_snapshot", interrupted_while_saving)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, small_run(tiny_model_dir, eval_file, out))
    assert result.exit_code == 0, result.output  # every iteration ran and the end was saved
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["iterations"] == 5
    assert (out / "snapshots" / "iter-5" / "state.json").is_file()


@pytest.mark.parametrize(
    ("summary", "code", "stderr"),
    [
        ({"status": "finished", "reason": "max_iters", "signal": "SIGTERM"}, 0, ""),
        ({"status": "stopped", "reason": "requested", "signal": "SIGTERM"}, 130, ""),
        ({"status": "stopped", "reason": "requested"}, 0, ""),  # q
        ({"status": "stopped", "reason": "SIGTERM"}, 130, ""),  # the run says the signal stopped it
        (
            {"status": "collapsed", "reason": "collapsed", "final_snapshot_failed": "disk full"},
            1,
            "collapse-tui: the final snapshot could not be saved (disk full); "
            "the run's records are kept, its last weights are not\n",
        ),
        (
            {"status": "stopped", "reason": "non-finite loss"},
            1,
            "collapse-tui: the run stopped on a non-finite loss; its data is kept\n",
        ),
    ],
)
def test_the_tui_command_exits_as_headless_does(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    summary: dict, code: int, stderr: str,
):  # fmt: skip
    def ended_run(engine):
        (engine.run_dir / "config.json").write_text("{}")
        return summary

    monkeypatch.setattr("collapse_tui.tui.app.run_app", ended_run)
    result = CliRunner().invoke(app, small_run(tiny_model_dir, eval_file, tmp_path / "run")[1:])
    assert result.exit_code == code
    assert result.stderr == stderr


def test_a_ctrl_c_as_a_headless_run_starts_leaves_no_empty_default_folder(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def ctrl_c(self, engine, stream=None):  # the reporter is made right after the Engine claimed a folder
        raise KeyboardInterrupt

    monkeypatch.setattr("collapse_tui.headless.PlainReporter.__init__", ctrl_c)
    monkeypatch.chdir(tmp_path)
    args = small_run(tiny_model_dir, eval_file, tmp_path / "unused")
    out_at = args.index("--out")
    del args[out_at : out_at + 2]  # a default-named folder under runs/
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("pause", [True, False])
def test_quitting_a_watcher_that_leaves_the_run_paused_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pause: bool
):
    from runfolders import make_run

    run_dir = make_run(tmp_path / "run", "running", n=2)

    def watched_then_quit(source):
        if pause:
            source.controls.pause()  # space, then q
        return {"status": "running", "reason": "watcher detached"}

    monkeypatch.setattr("collapse_tui.tui.app.run_app", watched_then_quit)
    result = CliRunner().invoke(app, ["watch", str(run_dir)])
    assert result.exit_code == 0
    said = f"collapse-tui: the run in {run_dir} is paused and waits; to go on: collapse-tui watch {run_dir}, then space\n"
    assert result.stdout == (said if pause else "")


def test_a_run_started_with_relative_paths_resumes_from_another_folder(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    start = tmp_path / "start"
    start.mkdir()
    shutil.copytree(tiny_model_dir, start / "tiny")
    monkeypatch.chdir(start)
    args = small_run(Path("tiny"), eval_file, Path("run"))
    assert CliRunner().invoke(app, args).exit_code == 0
    summary = json.loads((start / "run" / "summary.json").read_text())
    assert summary["run_dir"] == str(start / "run")
    assert summary["last_snapshot"] == str(start / "run" / "snapshots" / "iter-5")
    assert json.loads((start / "run" / "config.json").read_text())["model"] == str(start / "tiny")

    monkeypatch.chdir(tmp_path)  # elsewhere: the paths the run wrote down still lead to it
    result = CliRunner().invoke(app, ["headless", "--resume", summary["last_snapshot"], "--max-iters", "6"])
    assert result.exit_code == 0, result.output
    assert json.loads((start / "run" / "summary.json").read_text())["iterations"] == 6


def test_a_resume_where_the_runs_device_is_missing_names_it_as_the_runs_and_the_way_out(
    tiny_model_dir: Path, eval_file: Path, tmp_path: Path
):
    """A run made on cuda:1, resumed where there is no such device (a scheduler showing one GPU; here,
    no GPU), was told "--device cuda:1: there is no such CUDA device" though no --device was typed."""
    out = tmp_path / "run"
    assert CliRunner().invoke(app, small_run(tiny_model_dir, eval_file, out)).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "device": "cuda:1"}))  # as a run on cuda:1 has it
    snapshot = str(out / "snapshots" / "iter-5")
    no_gpu = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # what this test says holds on a GPU machine too
    resumed = subprocess.run([sys.executable, "-m", "collapse_tui.cli", "headless", "--resume", snapshot,
                              "--max-iters", "6"], capture_output=True, text=True, env=no_gpu, timeout=300)  # fmt: skip
    assert_one_line_error(
        resumed, "the run used --device cuda:1, and no CUDA device is available here; give --device cpu"
    )
    (out / "config.json").write_text(json.dumps({**config, "device": "tpu"}))  # edited by hand: says so
    assert_one_line_error(
        cli("headless", "--resume", snapshot, "--max-iters", "6"), "--device 'tpu' is not a device"
    )
    (out / "config.json").write_text(json.dumps({**config, "device": "cuda:1"}))
    result = CliRunner().invoke(
        app, ["headless", "--resume", snapshot, "--max-iters", "6", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["iterations"] == 6


def test_a_run_given_no_out_inside_a_run_folder_is_refused_leaving_nothing_there(
    tiny_model_dir, eval_file, tmp_path, monkeypatch
):
    run = make_run(tmp_path / "outer", "finished", n=2)
    monkeypatch.chdir(run)
    result = CliRunner().invoke(
        app, ["headless", "--model", str(tiny_model_dir), "--eval", str(eval_file), "--device", "cpu"]
    )
    assert result.exit_code == 2
    assert f"the current folder is inside the run folder {run}" in result.stderr
    assert not (run / "runs").exists()


@pytest.mark.parametrize("option", ["--eval", "--out", "--model"])
def test_a_path_too_long_for_the_filesystem_is_one_line(tmp_path: Path, option: str) -> None:
    long = str(tmp_path / ("a" * 300))  # one part past 255 bytes: ENAMETOOLONG wherever it is looked at
    result = CliRunner().invoke(app, ["headless", option, long, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    # one line (newer Pythons report such a path as missing rather than raising: then its own line)
    assert result.stderr.startswith("collapse-tui: error: ") and result.stderr.count("\n") == 1


def test_the_top_help_says_that_no_command_opens_the_live_screen() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    words = " ".join(result.output.split())  # as wrapped to any width
    assert "With no command, the run goes on in the live screen" in words and "'headless'" in words


def test_the_live_screen_without_a_terminal_is_one_line_pointing_at_headless(
    tiny_model_dir, eval_file, tmp_path
):
    """``collapse-tui … > log </dev/null``: escape codes into a file, and a screen waiting for a q for ever."""
    out = tmp_path / "run"
    args = small_run(tiny_model_dir, eval_file, out)[1:]  # the live screen's command: no "headless"
    result = subprocess.run(
        [sys.executable, "-m", "collapse_tui.cli", *args],
        capture_output=True, text=True, env=ENV, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("collapse-tui: error: the live screen needs a terminal")
    assert "collapse-tui headless" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "runs").exists()  # nothing was made
    watched = cli("watch", str(make_run(tmp_path / "done", "finished", n=2)))
    assert watched.returncode == 2 and "the live screen needs a terminal" in watched.stderr
    assert "collapse-tui runs" in watched.stderr
