"""The headless runner's reporters, fed records and events by hand (no model)."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

from rich.console import Console
from runfolders import record

from collapse_tui.headless import ProgressReporter, format_losses, interrupted_line, summary_table
from collapse_tui.records import Event


def test_the_progress_bar_shows_the_losses_again_once_a_snapshot_is_saved() -> None:
    """Its last frame stays on the terminal: it must not read "saving snapshot iter-2" for good."""
    engine = SimpleNamespace(config=SimpleNamespace(max_iters=2))
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    reporter = ProgressReporter(engine, console)  # type: ignore[arg-type]
    try:
        reporter.on_event(Event("start", 0))
        for i in range(2):
            reporter.on_record(record(i))
        reporter.on_status("saving snapshot iter-2")
        assert reporter.progress.tasks[0].fields["losses"] == "saving snapshot iter-2"
        reporter.on_event(Event("snapshot", 2, data={"path": "run/snapshots/iter-2"}))
        assert reporter.progress.tasks[0].fields["losses"] == format_losses(record(1))
    finally:
        reporter.close()


def test_the_summary_gives_the_reason_only_where_it_adds_to_the_status() -> None:
    def status_row(status: str, reason: str) -> str:
        console = Console(width=100, record=True, color_system=None)
        console.print(summary_table({"status": status, "reason": reason, "iterations": 3, "run_dir": "/r"}))
        return next(line for line in console.export_text().splitlines() if "status" in line)

    assert "collapsed (collapsed)" not in status_row("collapsed", "collapsed")
    assert "finished (max_iters)" in status_row("finished", "max_iters")


def test_the_summary_shows_messages_and_paths_with_brackets_as_they_are() -> None:
    failed = "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"
    summary = {"status": "finished", "reason": "max_iters", "iterations": 3, "run_dir": "/r/[b]x",
               "final_snapshot_failed": failed}  # fmt: skip
    console = Console(width=300, record=True, color_system=None)
    console.print(summary_table(summary))
    text = console.export_text()
    assert f"failed: {failed}" in text and "/r/[b]x" in text


def test_the_summary_prints_rep4_rounded_down_as_everywhere_else() -> None:
    """0.89996 under a 0.9 threshold must not read 0.9000 in the summary either."""
    losses = {"gen_loss": 1.0, "valid": {"wikitext-2": 3.0}, "rep4": 0.05}
    summary = {"status": "finished", "reason": "max_iters", "iterations": 3, "run_dir": "/r",
               "first": losses, "last": {**losses, "rep4": 0.89996}}  # fmt: skip
    console = Console(width=200, record=True, color_system=None)
    console.print(summary_table(summary))
    assert "0.050 → 0.899" in console.export_text()


def test_the_progress_bar_shows_a_status_with_brackets_as_it_is() -> None:
    engine = SimpleNamespace(config=SimpleNamespace(max_iters=2))
    console = Console(file=io.StringIO(), force_terminal=True, width=200, color_system=None)
    reporter = ProgressReporter(engine, console)  # type: ignore[arg-type]
    try:
        reporter.on_status("loading model /models/[b]tiny")
        rendered = Console(width=200, record=True, color_system=None)
        rendered.print(reporter.progress.get_renderable())
        assert "loading model /models/[b]tiny" in rendered.export_text()
    finally:
        reporter.close()


def test_a_run_left_at_once_says_what_is_kept_and_what_it_can_go_on_from(tmp_path) -> None:
    assert interrupted_line(None, None) == "collapse-tui: interrupted while loading"
    snapshot = tmp_path / "snapshots" / "iter-4"
    assert interrupted_line(tmp_path, snapshot).endswith(
        f"records are in {tmp_path}; no final snapshot was saved; the newest is {snapshot}"
    )
    assert interrupted_line(tmp_path, snapshot, at_the_end=True).endswith(f"its final snapshot is {snapshot}")
    assert interrupted_line(tmp_path, None).endswith("there is no snapshot to resume from")


def test_at_80_columns_the_progress_line_keeps_the_count_the_time_left_and_rep4() -> None:
    """The losses give way, cut with an ellipsis: before, they squeezed the count to "4/…"."""
    engine = SimpleNamespace(config=SimpleNamespace(max_iters=1000))
    console = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    reporter = ProgressReporter(engine, console)  # type: ignore[arg-type]
    try:
        reporter.on_event(Event("start", 0))
        for i in range(4):
            reporter.on_record(record(i, evals=("wikitext-2-v1.valid", "ptb.test.tokenized")))
        drawn = Console(
            file=io.StringIO(), width=80, color_system=None
        )  # one frame, as the live one draws it
        drawn.print(reporter.progress.make_tasks_table(reporter.progress.tasks))
        line = drawn.file.getvalue().rstrip()  # type: ignore[attr-defined]
    finally:
        reporter.close()
    assert len(line) <= 80
    assert re.match(r"it +4/1000 .* (\d+:\d\d:\d\d|-:--:--) rep4 0\.400  gen_loss 2\.400 ", line), line
    assert line.endswith("…")


def test_a_second_ctrl_c_in_a_resumes_first_iteration_says_the_run_stands_as_it_was(
    tiny_config, tmp_path, monkeypatch, capsys
) -> None:
    """Not "its final snapshot is iter-2": that is the snapshot it resumed from, whose resume would
    abandon the iterations after it, which this resume left alone."""
    from collapse_tui.cli import build_config
    from collapse_tui.engine import Engine
    from collapse_tui.headless import run_headless

    tiny_config.out, tiny_config.max_iters, tiny_config.snapshot_every = str(tmp_path / "run"), 4, 2
    Engine(tiny_config).run()
    capsys.readouterr()

    def second_ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "step", second_ctrl_c)
    code = run_headless(build_config({"resume": tmp_path / "run" / "snapshots" / "iter-2", "max_iters": 4}))
    said = capsys.readouterr().err
    assert code == 130
    assert "stands as it was" in said and "final snapshot is" not in said
