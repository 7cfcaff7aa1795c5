"""``collapse-tui plot``: the Figure-2-style comparison and its merged CSV."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from runfolders import make_run, record

from collapse_tui.errors import UserError
from collapse_tui.plot import COLLAPSE_GID, GEN_PANEL, build_figure, load_runs, plot_runs
from collapse_tui.runfolder import RunWriter, read_run

EVALS = ("wikitext-2", "ptb")


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path / "slow", "finished", n=5, lr=4e-5, evals=EVALS),
        make_run(tmp_path / "fast", "collapsed", n=4, lr=1e-4, evals=EVALS, collapse_at=2),
    ]


def run_lines(ax) -> list:
    return [line for line in ax.get_lines() if (line.get_gid() or "").startswith("run:")]


def test_one_panel_per_eval_set_and_one_line_per_run(two_runs: list[Path]) -> None:
    figure = build_figure(load_runs(two_runs))
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [
        "validation loss: wikitext-2",
        "validation loss: ptb",
        GEN_PANEL,
    ]
    for ax in axes:
        lines = run_lines(ax)
        assert [line.get_label() for line in lines] == ["gpt2, lr 4e-05", "gpt2, lr 0.0001"]
        assert [len(line.get_xdata()) for line in lines] == [5, 4]
        collapse = [line for line in ax.get_lines() if line.get_gid() == COLLAPSE_GID.format(1)]
        assert len(collapse) == 1 and list(collapse[0].get_xdata()) == [2, 2]  # dotted line at iteration 2


def test_a_run_of_one_iteration_is_drawn_as_a_point(tmp_path: Path) -> None:
    one = make_run(tmp_path / "one", "stopped", n=1, evals=EVALS)
    figure = build_figure(load_runs([one]))
    lines = [line for ax in figure.axes if ax.get_visible() for line in run_lines(ax)]
    assert len(lines) == 3 and all(line.get_marker() == "o" for line in lines)  # not an empty panel
    ticks = [tick for ax in figure.axes if ax.get_visible() for tick in ax.get_xticks()]
    assert ticks and all(float(tick).is_integer() for tick in ticks)  # iterations, not -0.045 … 0.045


def figure_with_a_nan(tmp_path: Path, iterations: int, nan_at: int):
    """The figure of a run of ``iterations`` whose loss on generated text is NaN at iteration ``nan_at``."""
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"model": "gpt2", "lr": 4e-5})
    for i in range(iterations):
        writer.write_record(record(i, gen_loss=math.nan if i == nan_at else None))
    writer.close()
    return build_figure(load_runs([tmp_path / "run"]))


def test_a_panel_of_two_iterations_shows_both(tmp_path: Path) -> None:
    """Its values from iteration 1 (the first a NaN): whole-number ticks, and the first not cut off."""
    figure = figure_with_a_nan(tmp_path, 3, nan_at=0)
    gen = next(ax for ax in figure.axes if ax.get_visible() and ax.get_title() == GEN_PANEL)
    left, right = gen.get_xlim()
    assert left < 1 and right > 2
    assert all(float(tick).is_integer() for tick in gen.get_xticks())


def test_nothing_pays_for_matplotlib_until_a_figure_is_drawn() -> None:
    code = "import sys, collapse_tui.plot, collapse_tui.runs, collapse_tui.follow; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_nan_values_are_left_out_of_the_lines(tmp_path: Path) -> None:
    figure = figure_with_a_nan(tmp_path, 4, nan_at=2)
    valid, gen = (run_lines(ax)[0] for ax in figure.axes if ax.get_visible())
    assert list(valid.get_xdata()) == [0, 1, 2, 3]
    assert list(gen.get_xdata()) == [0, 1, 3]


def test_the_png_and_the_csv_are_written(two_runs: list[Path], tmp_path: Path) -> None:
    out, table = tmp_path / "fig.png", tmp_path / "metrics.csv"
    plot_runs(two_runs, out, csv=table)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "run",
        "model",
        "lr",
        "iteration",
        "gen_loss",
        "valid_wikitext-2",
        "valid_ptb",
        "rep4",
        "distinct1",
        "unique_tokens",
        "compression_ratio",
        "collapsed",
    ]
    assert [(r["run"], int(r["iteration"])) for r in rows] == [("slow", i) for i in range(5)] + [
        ("fast", i) for i in range(4)
    ]
    assert float(rows[6]["valid_ptb"]) == pytest.approx(4.5)
    assert [r["collapsed"] for r in rows[5:]] == ["0", "0", "1", "1"]


def test_other_formats_come_from_the_extension(two_runs: list[Path], tmp_path: Path) -> None:
    plot_runs(two_runs, tmp_path / "fig.svg")
    assert b"<svg" in (tmp_path / "fig.svg").read_bytes()[:400]


def test_mistakes_give_one_clear_line(two_runs: list[Path], tmp_path: Path) -> None:
    (tmp_path / "no-runs").mkdir()
    with pytest.raises(UserError, match="not a run folder"):
        plot_runs([tmp_path / "no-runs"], tmp_path / "f.png")
    empty = tmp_path / "empty"
    RunWriter(empty).write_config({"model": "gpt2", "lr": 4e-5})
    with pytest.raises(UserError, match="has no iterations yet"):
        plot_runs([empty], tmp_path / "f.png")
    with pytest.raises(UserError, match=r"unknown image format '\.xyz'"):
        plot_runs(two_runs, tmp_path / "f.xyz")
    with pytest.raises(UserError, match="does not exist"):
        plot_runs(two_runs, tmp_path / "missing" / "f.png")
    with pytest.raises(UserError, match="cannot write"):
        plot_runs(two_runs, tmp_path / "f.png", csv=tmp_path / "missing" / "m.csv")
    with pytest.raises(UserError, match="at least one"):
        plot_runs([], tmp_path / "f.png")


def test_a_csv_that_cannot_be_written_leaves_no_figure_behind(two_runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"folder .*missing does not exist"):
        plot_runs(two_runs, tmp_path / "fig.png", tmp_path / "missing" / "merged.csv")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(UserError, match="a-folder: it is a folder; give a file name"):
        plot_runs(two_runs, tmp_path / "fig.png", tmp_path / "a-folder")
    assert not (tmp_path / "fig.png").exists()
    (tmp_path / "figures.png").mkdir()
    with pytest.raises(UserError, match=r"figures\.png: it is a folder"):
        plot_runs(two_runs, tmp_path / "figures.png")


def test_a_figure_or_csv_that_fails_half_way_leaves_the_one_before_as_it_was(
    two_runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    figure, merged = tmp_path / "fig.png", tmp_path / "merged.csv"
    figure.write_bytes(b"the figure before")
    merged.write_text("the csv before")

    def savefig_filling_the_disk(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG cut off")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig_filling_the_disk)
    with pytest.raises(UserError, match=r"cannot write .*fig\.png: No space left on device"):
        plot_runs(two_runs, figure)
    monkeypatch.undo()

    def writerows_filling_the_disk(self, rows):
        self.writerow(next(iter(rows)))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", writerows_filling_the_disk)
    with pytest.raises(UserError, match=r"cannot write .*merged\.csv: No space left on device"):
        plot_runs(two_runs, tmp_path / "new.png", csv=merged)
    assert figure.read_bytes() == b"the figure before"
    assert merged.read_text() == "the csv before"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fast",
        "fig.png",
        "merged.csv",
        "slow",
    ]  # no new.png


def test_a_csv_given_the_figures_own_file_is_refused_before_anything_is_written(
    two_runs: list[Path], tmp_path: Path
) -> None:
    mine = tmp_path / "same.png"
    mine.write_text("MY FILE")
    (tmp_path / "link.csv").symlink_to(mine)
    with pytest.raises(UserError, match="is the figure's file too; give the CSV a name of its own"):
        plot_runs(two_runs, mine, csv=tmp_path / "link.csv")
    with pytest.raises(UserError, match=r"same\.png: give a file name ending in \.csv"):
        plot_runs(two_runs, mine, csv=mine)
    assert mine.read_text() == "MY FILE"


def test_a_csv_is_never_written_over_a_runs_own_files_or_an_evaluation_file(
    two_runs: list[Path], tmp_path: Path
) -> None:
    """``--csv RUN/metrics.jsonl`` replaced the run's records (on a live run, every later iteration was
    lost); ``--csv held.txt`` an evaluation file."""
    metrics = two_runs[0] / "metrics.jsonl"
    held = tmp_path / "held.txt"
    held.write_text("the evaluation text")
    before = metrics.read_bytes()
    for target in (metrics, held, two_runs[0] / "config.json"):
        with pytest.raises(UserError, match=r"give a file name ending in \.csv"):
            plot_runs(two_runs, tmp_path / "fig.png", csv=target)
    assert metrics.read_bytes() == before and held.read_text() == "the evaluation text"
    assert not (tmp_path / "fig.png").exists()


def test_a_figure_given_a_folder_or_a_path_through_a_file_says_which(
    two_runs: list[Path], tmp_path: Path
) -> None:
    (tmp_path / "figs").mkdir()
    with pytest.raises(UserError, match=r"figs: it is a folder; give a file name"):
        plot_runs(two_runs, tmp_path / "figs")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"afile is a file, not a folder"):
        plot_runs(two_runs, tmp_path / "afile" / "x.png")


def test_runs_of_one_name_in_different_folders_are_told_apart(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / sweep / "lr", "finished", n=3) for sweep in ("sweep-a", "sweep-b")]
    table = tmp_path / "metrics.csv"
    plot_runs(runs, tmp_path / "fig.png", csv=table)
    figure = build_figure(load_runs(runs))
    labels = [line.get_label() for line in run_lines(figure.axes[0])]
    assert labels == ["gpt2, lr 4e-05 (sweep-a/lr)", "gpt2, lr 4e-05 (sweep-b/lr)"]
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == labels  # two entries, not one for both lines
    with open(table, newline="", encoding="utf-8") as handle:
        assert sorted({row["run"] for row in csv.DictReader(handle)}) == ["sweep-a/lr", "sweep-b/lr"]


def test_a_run_given_as_dot_is_named_by_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path / "my-run", "finished", n=2)
    monkeypatch.chdir(tmp_path / "my-run")
    table = tmp_path / "metrics.csv"
    plot_runs([Path(".")], tmp_path / "fig.png", csv=table)
    with open(table, newline="", encoding="utf-8") as handle:
        assert {row["run"] for row in csv.DictReader(handle)} == {"my-run"}


def test_a_label_shows_an_lr_changed_during_the_run(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"model": "gpt2", "lr": 4e-5})
    for i in range(3):
        writer.write_record(record(i, lr=4e-5 if i == 0 else 1e-2))
    writer.close()
    figure = build_figure(load_runs([tmp_path / "run"]))
    assert run_lines(figure.axes[0])[0].get_label() == "gpt2, lr 4e-05 → 0.01"


def test_a_run_with_no_finite_loss_is_nothing_to_plot(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"model": "gpt2", "lr": 4e-5})
    nan_record = record(0, gen_loss=math.nan)
    nan_record.valid = {"wikitext-2": math.nan}
    writer.write_record(nan_record)
    writer.close()
    with pytest.raises(UserError, match="no finite loss"):
        load_runs([tmp_path / "run"])
    # beside a run that has losses, it is left out (and said so), not the whole figure
    other = make_run(tmp_path / "other", "finished", n=3)
    skipped = plot_runs([tmp_path / "run", other], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").is_file()
    assert len(skipped) == 1 and "no finite loss" in skipped[0]


def test_a_run_given_twice_is_drawn_once(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "finished", n=3)
    figure = build_figure(load_runs([run, tmp_path / "." / "run"]))
    assert len(run_lines(figure.axes[0])) == 1


def test_a_sweep_of_more_than_ten_runs_gets_a_look_for_each(tmp_path: Path) -> None:
    # matplotlib has ten colours: past them, the dashes tell runs apart
    runs = [make_run(tmp_path / f"lr{k}", "finished", n=3, lr=1e-5 * (k + 1)) for k in range(23)]
    figure = build_figure(load_runs(runs))
    from matplotlib.colors import to_hex

    looks = {(to_hex(line.get_color()), str(line.get_linestyle())) for line in run_lines(figure.axes[0])}
    assert len(looks) == 23
    assert figure.legends[0].get_title().get_text() == ""  # no run collapsed: no word of a mark


def test_the_legend_explains_the_mark_only_when_a_run_collapsed(two_runs: list[Path]) -> None:
    figure = build_figure(load_runs(two_runs))
    assert figure.legends[0].get_title().get_text() == "× marks the collapse"


def test_a_folder_of_runs_stands_for_the_runs_under_it(tmp_path: Path) -> None:
    # `collapse-tui plot runs` as `collapse-tui runs` lists them, oldest first
    for k, name in enumerate(("b-new", "a-old")):
        make_run(tmp_path / "runs" / name, "finished", n=3, lr=1e-5 * (k + 1), created=2_000.0 - k)
    runs = load_runs([tmp_path / "runs"])
    assert [run.root.name for run in runs] == ["a-old", "b-new"]
    assert [run.root.name for run in load_runs([tmp_path])] == ["a-old", "b-new"]  # found further down too
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run folder"):
        load_runs([tmp_path / "empty"])
    broken = tmp_path / "runs" / "c-broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")  # a run's files, its config garbled
    (broken / "metrics.jsonl").write_text("")
    skipped: list[str] = []
    assert len(load_runs([tmp_path / "runs"], skipped)) == 2
    assert len(skipped) == 1 and "c-broken" in skipped[0]  # said, as plot says what it left out
    skipped.clear()
    assert len(load_runs([tmp_path / "runs", tmp_path / "runs"], skipped)) == 2 and len(skipped) == 1
    with pytest.raises(
        UserError, match="c-broken"
    ):  # the only run there cannot be read: why, not "not a run"
        load_runs([_only(broken)])


def _only(run: Path) -> Path:
    """A folder holding ``run`` alone (moved there)."""
    alone = run.parent.parent / "alone"
    alone.mkdir()
    run.rename(alone / run.name)
    return alone


def test_names_with_dollars_are_drawn_as_they_are_not_as_mathtext(tmp_path: Path) -> None:
    make_run(tmp_path / "lr$\\foo$", "finished", model="/m/x$\\bar$")
    make_run(tmp_path / "b", "finished", lr=1e-4)
    out = tmp_path / "f.png"
    assert plot_runs([tmp_path / "lr$\\foo$", tmp_path / "b"], out) == []  # no ValueError from mathtext
    figure = build_figure([read_run(tmp_path / "lr$\\foo$"), read_run(tmp_path / "b")])
    texts = figure.legends[0].get_texts()
    assert any("x$\\bar$" in text.get_text() for text in texts)
    assert not any(text.get_parse_math() for text in texts)


def test_a_name_starting_with_an_underscore_is_in_the_legend(tmp_path: Path) -> None:
    make_run(tmp_path / "a", "finished", model="/m/_ckpt")
    make_run(tmp_path / "b", "finished", lr=1e-4)
    figure = build_figure([read_run(tmp_path / "a"), read_run(tmp_path / "b")])
    assert [text.get_text() for text in figure.legends[0].get_texts()] == [
        "_ckpt, lr 4e-05",
        "gpt2, lr 0.0001",
    ]


@pytest.mark.parametrize("runs", [4, 36])
def test_the_legend_of_a_sweep_with_seeds_fits_in_the_figure(tmp_path: Path, runs: int) -> None:
    """Runs that share model and lr are named by their folders too: long labels, which must all show."""
    folders = [
        make_run(tmp_path / f"gpt2-medium-lr{lr:g}-seed{seed}", "finished", n=3, lr=lr, model="gpt2-medium")
        for lr in (4e-5, 1e-4, 4e-4, 1e-3, 4e-3, 1e-2)[: max(2, runs // 6)]
        for seed in range(runs // max(2, runs // 6))
    ]
    assert len(folders) == runs
    figure = build_figure(load_runs(folders))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()
    legend, page = figure.legends[0].get_window_extent(), figure.bbox
    assert page.x0 <= legend.x0 and legend.x1 <= page.x1 and page.y0 <= legend.y0
    for ax in figure.axes:  # and the panels keep their room above it
        if ax.get_visible():
            assert ax.get_window_extent().height > page.height / 6


def test_a_run_given_through_a_link_is_drawn_once(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "finished", n=3)
    (tmp_path / "link").symlink_to(run)
    assert len(load_runs([run, tmp_path / "link"])) == 1


def test_a_name_the_font_cannot_draw_gives_no_warning(tmp_path: Path) -> None:
    run = make_run(tmp_path / "模型-😀", "finished", n=3, model="模型😀")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Glyph … missing from font" is not the user's to act on
        plot_runs([run], tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
