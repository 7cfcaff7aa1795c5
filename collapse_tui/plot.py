"""``collapse-tui plot RUN_DIR… -o fig.png``: runs compared in the manner of the paper's Figure 2.

One panel per evaluation set (validation loss against iteration) and one
for the loss on the model's own generated text, one line per run labelled by
model and learning rate, each run's collapse marked where it happened. The
same numbers can be written as one merged CSV for other tools.

matplotlib is imported inside the functions that draw, so the TUI and the
headless runner never pay for it.
"""

from __future__ import annotations

import csv as csv_module
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collapse_tui.errors import UserError
from collapse_tui.runfolder import CONFIG, RunFolder, read_run, writing_whole
from collapse_tui.runs import find_runs, lr_text, model_label, run_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The gid of each run's line ("run:<index>") and collapse mark ("collapse:<index>"), for tests and tools.
LINE_GID = "run:{}"
COLLAPSE_GID = "collapse:{}"
GEN_PANEL = "loss on generated text"


def _runs_in(paths: list[Path], skipped: list[str]) -> list[Path]:
    """``paths``, a folder of runs (a sweep, or ``runs``) standing for the runs under it, as ``runs`` lists them.

    A folder under it that cannot be read as a run is named in ``skipped``, as ``runs`` names it.
    """
    expanded: list[Path] = []
    for path in map(Path, paths):
        reasons: list[str] = []
        found = find_runs(path, skipped=reasons) if path.is_dir() and not (path / CONFIG).exists() else []
        if reasons and not found:  # runs, none of them readable: say why, not "not a run folder"
            raise UserError(reasons[0])
        skipped.extend(reason for reason in reasons if reason not in skipped)  # a folder given twice: once
        if found:
            expanded.extend(run.root for run in found)
        else:
            expanded.append(path)
    return expanded


def load_runs(run_dirs: list[Path], skipped: list[str] | None = None) -> list[RunFolder]:
    """Read the runs to plot; a folder that is not a run is a ``UserError``.

    A run with nothing to draw yet (no iteration, or no finite loss) is left
    out, its reason appended to ``skipped``, so that one empty or NaN run
    does not cost the figure of the others; if no run is left, that is the
    ``UserError``.
    """
    if not run_dirs:
        raise UserError("give at least one run folder to plot")
    runs, empty, seen = [], [], set()
    for run_dir in _runs_in(run_dirs, empty):
        where = os.path.realpath(run_dir)
        if where in seen:  # one folder named twice (or spelled two ways, or through a link): once
            continue
        seen.add(where)
        run = read_run(Path(run_dir))
        if not run.records:
            empty.append(f"{run_dir} has no iterations yet: nothing to plot")
        elif not any(_series(run, panel)[0] for panel in _panels([run])):
            empty.append(
                f"{run_dir} has no finite loss (every one is NaN or inf): nothing to plot (nor in the CSV)"
            )
        else:
            runs.append(run)
    if not runs:
        raise UserError(empty[0])
    if skipped is not None:
        skipped.extend(empty)
    return runs


def run_label(run: RunFolder) -> str:
    """Model and lr (the lr it started with, and the last it ran at where a command changed it)."""
    return f"{model_label(run.config)}, lr {lr_text(run)}"


def _labels(runs: list[RunFolder]) -> list[str]:
    """Model and lr; runs that share them are told apart by their folder names."""
    labels = [run_label(run) for run in runs]
    return [
        f"{label} ({name})" if labels.count(label) > 1 else label
        for label, name in zip(labels, run_names(runs), strict=True)
    ]


def _panels(runs: list[RunFolder]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [name for name in run.eval_names if name not in names]
    return [*names, GEN_PANEL]


def _series(run: RunFolder, panel: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of one panel for one run, NaN (and missing) values left out."""
    xs, ys = [], []
    for record in run.records:
        value = record.gen_loss if panel == GEN_PANEL else record.valid.get(panel, math.nan)
        if math.isfinite(value):
            xs.append(record.iteration)
            ys.append(value)
    return xs, ys


#: Line styles for runs past matplotlib's ten colours (a sweep); a dotted line marks a collapse.
_DASHES: tuple[Any, ...] = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)))


def _look(index: int) -> tuple[str, Any]:
    """The colour and dashes of the ``index``-th run: ten colours, then the same ten dashed, …"""
    return f"C{index % 10}", _DASHES[(index // 10) % len(_DASHES)]


def build_figure(runs: list[RunFolder]) -> Figure:
    """The figure itself (no file): one Axes per panel, one line per run that has the panel's data.

    Its texts are never mathtext: a folder or model name with two ``$`` in it
    would be typeset, or fail to parse when the figure is drawn.
    """
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        return _draw_figure(runs)


def _draw_figure(runs: list[RunFolder]) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = _panels(runs)
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    labels = _labels(runs)
    for ax, panel in zip(axes, panels, strict=False):
        for index, (run, label) in enumerate(zip(runs, labels, strict=True)):
            xs, ys = _series(run, panel)
            if not xs:
                continue
            collapsed_at = run.collapsed_at
            mark = [xs.index(collapsed_at)] if collapsed_at in xs else []
            colour, dashes = _look(index)
            if mark:  # the marker only where (and if) the run collapsed, so the legend shows which did
                style: dict[str, Any] = {"marker": "X", "markevery": mark, "markersize": 9}
            else:  # a run of one iteration is a point, which a line alone does not draw
                style = {"marker": "o", "markersize": 5} if len(xs) == 1 else {}
            (line,) = ax.plot(
                xs,
                ys,
                label=label,
                color=colour,
                linestyle=dashes,
                linewidth=1.4,
                **style,
            )
            line.set_gid(LINE_GID.format(index))
            if collapsed_at is not None:
                mark_line = ax.axvline(collapsed_at, color=colour, linestyle=":", linewidth=1.2)
                mark_line.set_gid(COLLAPSE_GID.format(index))
        ax.set_title(panel if panel == GEN_PANEL else f"validation loss: {panel}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        left, right = ax.get_xlim()
        if right - left < 2:  # one or two iterations: matplotlib's ±5 % around them has no other whole number
            first = math.floor((left + right) / 2)
            ax.set_xlim(first - 0.5, first + 1.5)  # a lone one's next: where a NaN may have stopped it
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    # One legend for the figure: a run missing from the first panel (other evaluation sets) still appears.
    # The lines are gathered here, not asked back from the axes, which leave out labels starting with "_".
    handles: dict[str, Any] = {}
    for ax in axes[: len(panels)]:
        for line in ax.get_lines():
            if str(line.get_gid()).startswith(LINE_GID.format("")):
                handles.setdefault(str(line.get_label()), line)
    any_collapse = any(run.collapsed_at is not None for run in runs)
    _fitted_legend(figure, handles, "× marks the collapse" if any_collapse else None)
    return figure


def _fitted_legend(figure: Figure, handles: dict[str, Any], title: str | None) -> None:
    """The legend under the panels, in as many columns (up to 4) as fit the figure's width, the figure
    made taller by its rows (and wider, if even one column is too wide for it).

    Why measured: a sweep's runs that share model and lr are named by their
    folders too, and four such labels to a row ran off both sides of the
    page, leaving lines with no name.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    width, height = figure.get_size_inches()
    for columns in range(min(len(handles), 4), 0, -1):
        legend = figure.legend(
            list(handles.values()), list(handles), loc="outside lower center", ncols=columns,
            fontsize="small", title=title, title_fontsize="small",
        )  # fmt: skip
        box = legend.get_window_extent(renderer)
        if box.width <= figure.bbox.width or columns == 1:
            break
        legend.remove()
    figure.set_size_inches(max(width, box.width / figure.dpi + 0.2), height + box.height / figure.dpi)


def _check_image_path(out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if out.is_dir():  # before its extension: "unknown image format ''" said nothing of the folder
        _check_writable_name(out)
    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise UserError(
            f"cannot write {out}: unknown image format {out.suffix or '(none)'!r}; use .png, .pdf or .svg"
        )
    _check_writable_name(out)


def _check_writable_name(path: Path) -> None:
    """The figure's and the CSV's paths fail alike: a missing folder, or a folder where the file goes."""
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"cannot write {path}: {path.parent} is a file, not a folder")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name")


def _check_csv_path(csv: Path, out: Path) -> None:
    """The CSV goes to a ``.csv`` file, and not the figure's.

    Why the extension: ``--csv RUN/metrics.jsonl`` (a slip of the shell's
    completion) replaced a run's own records with CSV, and on a live run
    every later iteration went to a file no longer in its folder;
    ``--csv held.txt`` replaced an evaluation file.
    """
    _check_writable_name(csv)
    if csv.suffix.lower() != ".csv":
        raise UserError(
            f"--csv {csv}: give a file name ending in .csv (a file of any other kind would be replaced)"
        )
    if os.path.realpath(csv) == os.path.realpath(out):  # one would be written over the other
        raise UserError(f"--csv {csv} is the figure's file too; give the CSV a name of its own")


def plot_runs(run_dirs: list[Path], out: Path, csv: Path | None = None) -> list[str]:
    """Draw the runs into ``out`` (format from its extension); with ``csv``, write their merged metrics.

    Returns why runs were left out (``load_runs``), for the caller to say.
    """
    out = Path(out)
    skipped: list[str] = []
    runs = load_runs(run_dirs, skipped)
    _check_image_path(out)
    if csv is not None:  # before the figure: all or nothing
        _check_csv_path(Path(csv), out)
    # matplotlib's warnings (a glyph its font lacks, for a CJK or emoji name) are not the user's to act on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from", category=UserWarning)
        figure = build_figure(runs)
        # both under names of their own until both are written: a failure (a full disk) leaves the
        # figure and CSV there before as they were, and no new figure beside an old CSV
        writing = out
        try:
            with writing_whole(out) as partial_figure:
                figure.savefig(partial_figure, dpi=150)
                if csv is not None:
                    writing = Path(csv)
                    with writing_whole(Path(csv)) as partial_csv:
                        write_csv(runs, partial_csv)
        except OSError as error:
            raise UserError(f"cannot write {writing}: {error.strerror or error}") from None
    return skipped


CSV_FIELDS = ("run", "model", "lr", "iteration", "gen_loss")
CSV_TAIL = ("rep4", "distinct1", "unique_tokens", "compression_ratio", "collapsed")


def csv_rows(runs: list[RunFolder]) -> tuple[list[str], list[dict[str, Any]]]:
    """(header, rows): one row per run and iteration; an eval set's column is ``valid_<name>``.

    ``lr`` is the rate that iteration used; NaN and missing values are empty
    cells; ``collapsed`` is 1 or 0.
    """
    eval_names = _panels(runs)[:-1]
    header = [*CSV_FIELDS, *(f"valid_{name}" for name in eval_names), *CSV_TAIL]

    def cell(value: float) -> float | str:
        return value if math.isfinite(value) else ""

    rows = []
    for run, run_name in zip(runs, run_names(runs), strict=True):
        for record in run.records:
            row: dict[str, Any] = {
                "run": run_name,
                "model": model_label(run.config),
                "lr": cell(record.lr),
                "iteration": record.iteration,
                "gen_loss": cell(record.gen_loss),
                "rep4": cell(record.rep4),
                "distinct1": cell(record.distinct1),
                "unique_tokens": record.unique_tokens,
                "compression_ratio": cell(record.compression_ratio),
                "collapsed": int(record.collapsed),
            }
            for name in eval_names:
                row[f"valid_{name}"] = cell(record.valid.get(name, math.nan))
            rows.append(row)
    return header, rows


def write_csv(runs: list[RunFolder], path: Path) -> None:
    """One row per run and iteration, every evaluation set a column (``csv_rows``)."""
    header, rows = csv_rows(runs)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv_module.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
