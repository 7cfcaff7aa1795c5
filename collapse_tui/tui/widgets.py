"""The panes of the live TUI: loss charts, repetition meter, sample, status line, event log.

Each widget is fed plain values by the app (never the engine), so it can be
drawn from fake records in tests and stays cheap over thousands of iterations.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable
from fractions import Fraction

from rich.style import Style
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Footer, RichLog, Sparkline, Static

from collapse_tui.metrics import CollapseDetector, format_rate, format_rep4, repeated_ngram_mask


def fmt_num(value: float | None, digits: int = 3) -> str:
    """A short number for a narrow pane; NaN and inf spelled out instead of hidden."""
    if value is None:
        return "–"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    tiny = value != 0 and abs(value) < 1e-3
    return f"{value:.{digits}g}" if tiny or abs(value) >= 1e4 else f"{value:.{digits}f}"


def fmt_loss(value: float | None) -> str:
    """Three significant digits: enough to see a loss move, short enough for 80 columns."""
    return fmt_num(value) if value is None or not math.isfinite(value) else f"{value:.3g}"


def fmt_lr(value: float) -> str:
    return f"{value:.3g}"


def fmt_duration(seconds: float | None) -> str:
    """h:mm:ss, or – when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Downsampled:
    """A series kept to at most ``capacity`` points by averaging neighbours as it grows.

    A run of thousands of iterations must not grow the chart's memory or its
    redraw cost: when full, pairs are merged and each later point stands for
    twice as many iterations. Non-finite values never enter (Sparkline cannot
    draw NaN); they are counted so the pane can say so. Each point remembers
    the ordinal of the first value it stands for, so ``point_of`` can tell
    which point holds a given iteration (for the browsing marker).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = max(2, capacity - capacity % 2)
        self.clear()

    def clear(self) -> None:
        """Forget every value (the chart's widgets keep this object, so it is emptied in place)."""
        self.points: list[float] = []
        #: The ordinal (among all values added, finite or not) of the first value behind each point.
        self.starts: list[int] = []
        self.stride = 1
        self._acc: list[float] = []
        self._acc_start = 0
        self.added = 0
        self.last: float | None = None
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.bad = 0

    def add(self, value: float) -> None:
        self.last = value
        ordinal = self.added
        self.added += 1
        if not math.isfinite(value):
            self.bad += 1
            return
        self.count += 1
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        if not self._acc:
            self._acc_start = ordinal
        self._acc.append(value)
        if len(self._acc) < self.stride:
            return
        self.points.append(sum(self._acc) / len(self._acc))
        self.starts.append(self._acc_start)
        self._acc = []
        if len(self.points) >= self.capacity:
            pairs = zip(self.points[0::2], self.points[1::2], strict=True)
            self.points = [(a + b) / 2 for a, b in pairs]
            self.starts = self.starts[0::2]
            self.stride *= 2

    def data(self) -> list[float]:
        """The points to draw, including the partly filled last bucket."""
        if self._acc:
            return [*self.points, sum(self._acc) / len(self._acc)]
        return list(self.points)

    def point_of(self, ordinal: int) -> int | None:
        """The index in ``data()`` of the point holding the ``ordinal``-th value added.

        A non-finite value has no point of its own: the point before it stands in.
        """
        starts = [*self.starts, self._acc_start] if self._acc else self.starts
        if not starts:
            return None
        return max(bisect_right(starts, ordinal) - 1, 0)


def sparkline_columns(index: int, count: int, width: int) -> list[int]:
    """The columns of a ``width``-cell Sparkline of ``count`` points that draw point ``index``.

    Mirrors the bucketing of ``textual.renderables.sparkline.Sparkline``: with
    at least as many points as cells, each cell summarises a run of points;
    with fewer, each point is stretched over one or more cells.
    """
    if count <= 0 or width <= 0 or not 0 <= index < count:
        return []
    if count == 1:
        return list(range(width))
    step = Fraction(count, width)
    spans = [(int(step * cell), int(step * (cell + 1))) for cell in range(width)]
    buckets = [(start, end) for start, end in spans if end > start]
    columns = []
    position, stride = 0.0, len(buckets) / width  # float steps, as the renderable takes them
    for column in range(width):
        start, end = buckets[int(position)]
        if start <= index < end:
            columns.append(column)
        position += stride
    return columns


class ChartMarker(Widget):
    """A row of ``▲`` under a sparkline, at the columns of the iteration being browsed."""

    DEFAULT_CSS = "ChartMarker { height: 1; width: 1fr; color: $accent; text-style: bold; }"

    def __init__(self, series: Downsampled, **kwargs) -> None:
        super().__init__(**kwargs)
        self.series = series
        #: The ordinal of the record shown, or None while following the latest.
        self.ordinal: int | None = None

    def render(self) -> Text:
        point = None if self.ordinal is None else self.series.point_of(self.ordinal)
        if point is None:
            return Text("")
        count = len(self.series.data())
        row = [" "] * self.size.width
        for column in sparkline_columns(point, count, self.size.width):
            row[column] = "▲"
        return Text("".join(row))


def series_caption(title: str, series: Downsampled, width: int) -> Text:
    """``title`` with the series' last, min and max, fitted into ``width`` cells.

    The numbers are what the caption is for, so they give way last: first
    the words min/max become arrows, then the name is shortened with an
    ellipsis (an evaluation file's stem can be long: ``wikitext-2-v1.valid``).
    """
    last, low, high = fmt_loss(series.last), fmt_loss(series.min), fmt_loss(series.max)
    forms = [
        (f"  min {low} max {high}", f"  ({series.bad} non-finite)"),
        (f" ↓{low} ↑{high}", f" ({series.bad} bad)"),
    ]
    name = title
    for extremes, bad in forms:
        extremes, bad = (extremes if series.count else ""), (bad if series.bad else "")
        numbers = len(last) + len(extremes) + len(bad)
        if len(title) + 1 + numbers <= width:
            break
    else:  # even the short form is too wide: shorten the name
        room = max(width - 1 - numbers, 4)
        name = title if len(title) <= room else title[: room - 1] + "…"
    text = Text.assemble((name, "bold"), " ", (last, "bold"))
    text.append(extremes, style="dim")
    text.append(bad, style="bold red")
    return text


class SeriesTitle(Widget):
    """A series' caption line, redrawn to fit whatever width the pane gives it."""

    DEFAULT_CSS = "SeriesTitle { width: 1fr; height: 1; }"

    def __init__(self, title: str, series: Downsampled, **kwargs) -> None:
        super().__init__(**kwargs)
        self.title = title
        self.series = series

    def render(self) -> Text:
        return series_caption(self.title, self.series, self.size.width or 80)


class MarkedSparkline(Sparkline):
    """A sparkline that shows the browsed iteration's columns in reverse video where its chart has no
    row for the ``▲`` marker under it (five charts or more share 80×24's rows: two each)."""

    def __init__(self, series: Downsampled, **kwargs) -> None:
        super().__init__([], summary_function=max, **kwargs)
        self.series = series
        #: The ordinal of the record shown, or None while following the latest.
        self.ordinal: int | None = None

    def render_line(self, y: int) -> Strip:
        line = super().render_line(y)
        chart = self.parent
        if self.ordinal is None or not isinstance(chart, Widget) or chart.size.height >= MARKED_CHART_ROWS:
            return line
        point = self.series.point_of(self.ordinal)
        columns = [] if point is None else sparkline_columns(point, len(self.series.data()), line.cell_length)
        if not columns:
            return line
        start, end = columns[0], columns[-1] + 1
        marked = line.crop(start, end).apply_style(Style(reverse=True))
        return Strip.join([line.crop(0, start), marked, line.crop(end, line.cell_length)])


#: Rows a chart needs to show its marker row while browsing: its title, its sparkline and the marker.
MARKED_CHART_ROWS = 3
#: Rows a chart takes at least (its title and one row of sparkline), and with room to spare on a
#: wide screen (two rows of sparkline and a blank row under it): ``LossCharts.on_resize``.
MIN_CHART_ROWS = 2
ROOMY_CHART_ROWS = 4


class SeriesChart(Vertical):
    """One loss series: a title line (name, last, min, max) over its sparkline."""

    DEFAULT_CSS = """
    SeriesChart { height: 1fr; min-height: 2; }
    SeriesChart > Sparkline { height: 1fr; min-height: 1; }
    """

    def __init__(self, title: str, capacity: int = 256, **kwargs) -> None:
        super().__init__(**kwargs)
        self.title = title
        self.series = Downsampled(capacity)

    def compose(self) -> ComposeResult:
        yield SeriesTitle(self.title, self.series, classes="series-title")
        yield MarkedSparkline(self.series)
        marker = ChartMarker(self.series)
        marker.display = False  # only while browsing: following, the shown iteration is the last column
        yield marker

    def on_resize(self, event: events.Resize) -> None:
        """Gaining or losing the marker's row changes how the sparkline marks (its own size may not)."""
        self.query_one(MarkedSparkline).refresh()

    def add(self, value: float) -> None:
        self.series.add(value)
        self.add_done()

    def add_done(self) -> None:
        """Redraw after values were added to ``series``."""
        self.query_one(SeriesTitle).refresh()
        self.query_one(MarkedSparkline).data = self.series.data()
        self.query_one(ChartMarker).refresh()  # a merge of points may move the marked column

    def mark(self, ordinal: int | None) -> None:
        """Mark the point of the ``ordinal``-th record under the sparkline; None removes the mark."""
        marker = self.query_one(ChartMarker)
        marker.ordinal = ordinal
        marker.display = ordinal is not None
        marker.refresh()
        sparkline = self.query_one(MarkedSparkline)
        sparkline.ordinal = ordinal
        sparkline.refresh()


class LossCharts(VerticalScroll):
    """One chart per loss series: gen_loss first, then each evaluation set."""

    def __init__(self, eval_names: Iterable[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.names = ["gen_loss", *eval_names]
        self.can_focus = False

    def compose(self) -> ComposeResult:
        for index, name in enumerate(self.names):
            yield SeriesChart(name, id=f"series-{index}")

    def on_resize(self, event: events.Resize) -> None:
        """Size the charts by the rows there are, not only the columns.

        Inside a scrolling pane, charts of height ``1fr`` that overflow it grow
        to the pane's height each (120×24 with three evaluation sets showed
        gen_loss over ten rows and hid the rest). So: roomy charts (a blank row
        between them) only where every chart gets four rows, and fixed
        two-row charts (title and one sparkline row) where not even two fit,
        so the pane scrolls by whole charts.
        """
        rows, count = self.size.height, len(self.names)
        self.set_class(rows >= ROOMY_CHART_ROWS * count, "-roomy")
        self.set_class(rows < MIN_CHART_ROWS * count, "-cramped")

    def add(self, gen_loss: float, valid: dict[str, float]) -> None:
        for index, name in enumerate(self.names):
            value = gen_loss if index == 0 else valid.get(name, math.nan)
            self.query_one(f"#series-{index}", SeriesChart).add(value)

    def replace(self, rows: Iterable[tuple[float, ...]]) -> None:
        """Draw ``rows`` from scratch, each the values of ``names`` in order (gen_loss, then each
        evaluation set): a resumed run's earlier iterations only."""
        rows = list(rows)
        for index in range(len(self.names)):
            chart = self.query_one(f"#series-{index}", SeriesChart)
            chart.series.clear()
            for row in rows:
                chart.series.add(row[index])
            chart.add_done()

    def mark(self, ordinal: int | None) -> None:
        """Mark the ``ordinal``-th record (counting from the first one added) on every chart."""
        for chart in self.query(SeriesChart):
            chart.mark(ordinal)


#: The states a run's meter can show, and the style of each.
STATE_STYLES = {
    "loading": "bold black on yellow",
    "running": "bold black on green",
    "pausing": "bold black on yellow",
    "paused": "bold black on yellow",
    "collapsed": "bold white on red",
    "finished": "bold black on cyan",
    "stopped": "bold black on cyan",
    "stopping": "bold black on yellow",
    "finishing": "bold black on cyan",
    "error": "bold white on red",
    "process gone": "bold white on red",
}


class RepetitionMeter(Widget):
    """rep4 as a bar against the collapse threshold, the other repetition numbers, and the state."""

    DEFAULT_CSS = "RepetitionMeter { height: 4; }"

    def __init__(self, threshold: float, patience: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.patience = patience
        self.state = "loading"
        #: What the run is busy with beside its iterations (a snapshot being saved), or "".
        self.note = ""
        self.rep4: float | None = None
        self.distinct1: float | None = None
        self.unique_tokens: int | None = None
        self.compression: float | None = None
        #: The engine's own rule, counted here to show how close a run is to collapsing.
        self.detector = CollapseDetector(threshold, patience)

    def set_state(self, state: str) -> None:
        self.state = state
        self.refresh()

    def set_note(self, note: str) -> None:
        """Say beside the state what the run is busy with (a large model's snapshot takes a while)."""
        self.note = note
        self.refresh()

    def replay(self, rep4s: Iterable[float]) -> None:
        """Count the streak above the threshold again over ``rep4s``: a resumed run's earlier iterations."""
        self.detector = CollapseDetector(self.threshold, self.patience)
        for rep4 in rep4s:
            self.detector.update(rep4)
        self.refresh()

    def update_metrics(self, rep4: float, distinct1: float, unique_tokens: int, compression: float) -> None:
        """A new iteration's numbers, counted towards the streak."""
        self.show_metrics(rep4, distinct1, unique_tokens, compression)
        self.detector.update(rep4)

    def show_metrics(self, rep4: float, distinct1: float, unique_tokens: int, compression: float) -> None:
        """Numbers already counted (``replay``): shown, not counted again."""
        self.rep4, self.distinct1 = rep4, distinct1
        self.unique_tokens, self.compression = unique_tokens, compression
        self.refresh()

    def render(self) -> Text:
        width = max(self.size.width, 20)
        state = Text(f" {self.state.upper()} ", style=STATE_STYLES.get(self.state, "bold reverse"))
        streak = self.detector.streak
        if self.note:
            state.append("  " + shorten(self.note, max(width - state.cell_len - 2, 1)), style="italic")
        elif streak and self.state in ("running", "pausing", "paused"):
            # past the patience only with --keep-going: the count goes on, the rule has been met
            count = f"{streak}/{self.patience}" if streak < self.patience else f"{streak} in a row"
            state.append(f"  above threshold {count}", style="bold yellow")
        value = f" {format_rep4(self.rep4)}/{self.threshold:g}"
        bar = self._bar(width - len("rep4 ") - len(value))
        lines = [
            state,
            Text.assemble(("rep4 ", "bold"), bar, (value, "bold")),
            self._numbers_line(width),
            Text.assemble(("compression ratio ", "dim"), fmt_num(self.compression, 2)),
        ]
        return Text("\n").join(lines)

    def _numbers_line(self, width: int) -> Text:
        """distinct-1 and the unique tokens on one line: the words shorten in a narrow pane rather than
        wrap (a wrapped line pushes the compression ratio out of the meter's four rows)."""
        unique = "–" if self.unique_tokens is None else str(self.unique_tokens)
        for label in ("  unique tokens ", "  unique "):
            line = Text.assemble(("distinct-1 ", "dim"), fmt_num(self.distinct1, 2), (label, "dim"), unique)
            if line.cell_len <= width:
                break
        return line

    def _bar(self, width: int) -> Text:
        """A bar of ``width`` cells; a ``│`` marks the threshold; red once at or past it."""
        width = max(width, 5)
        rep4 = self.rep4 if self.rep4 is not None and math.isfinite(self.rep4) else 0.0
        filled = round(min(max(rep4, 0.0), 1.0) * width)
        mark = min(width - 1, round(self.threshold * width))
        style = "red" if rep4 >= self.threshold else ("yellow" if rep4 >= self.threshold / 2 else "green")
        bar = Text()
        for cell in range(width):
            if cell == mark:
                bar.append("│", style="bold")
            elif cell < filled:
                bar.append("█", style=style)
            else:
                bar.append("░", style="dim")
        return bar


#: The pieces a sample is compared in: a word, a punctuation mark, or a letter run that repeats a
#: short unit four or more times ("reenreenreenreen"), which counts as its units: a loop with no
#: spaces ("!!!!", "----", "abcabcabcabc") is a loop of pieces too. Letters before such a run in
#: the same word ("T" of "Treenreen…", "2" of "2reenreen…") are a piece of their own, so the run is
#: still found; a number is not split between two digits, so that "1000000" stays one piece.
_PIECE = re.compile(r"(\w{1,16}?)\1{3,}|\w+?(?!(?<=\d)\d)(?=(\w{1,16}?)\2{3,})|\w+|[^\w\s]")


def _piece_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for match in _PIECE.finditer(text):
        unit = match.group(1)
        if unit:
            spans.extend((a, a + len(unit)) for a in range(match.start(), match.end(), len(unit)))
        else:
            spans.append(match.span())
    return spans


#: Readable even when the whole sample loops (a collapsed run), in 256 colours too.
REPEAT_STYLE = "bold yellow underline"


#: C0 controls but newline and tab, DEL and the C1 controls, each shown as one visible character.
_CONTROLS = {code: chr(0x2400 + code) for code in range(0x20) if chr(code) not in "\n\t"}
_CONTROLS |= {0x7F: "\u2421"} | {code: "\ufffd" for code in range(0x80, 0xA0)}


def visible_controls(text: str) -> str:
    """``text`` with its control characters replaced by visible stand-ins (ESC shows as ␛).

    Why: the sample is the model's own output, and 31 GPT-2 tokens decode to
    control bytes; written raw, an escape sequence from a collapsing model
    would recolour the terminal, retitle it or leave the alternate screen.
    One character for one, so the text keeps its length.
    """
    return text.translate(_CONTROLS)


def highlight_repeats(text: str, n: int = 4) -> Text:
    """The sample with every piece inside a repeated n-gram of pieces highlighted, its controls made visible.

    Records carry the text, not the token ids, so pieces (words, punctuation
    marks, the units of a letter loop: ``_PIECE``) stand in for tokens: a
    loop of tokens is a loop of pieces too.
    """
    text = visible_controls(text)
    result = Text(text)
    spans = _piece_spans(text)
    ids: dict[str, int] = {}
    words = [ids.setdefault(text[a:b], len(ids)) for a, b in spans]
    mask = repeated_ngram_mask(words, n)
    start: int | None = None
    for index, repeated in enumerate([*mask, False]):
        if repeated and start is None:
            start = spans[index][0]
        elif not repeated and start is not None:
            result.stylize(REPEAT_STYLE, start, spans[index - 1][1])
            start = None
    return mark_blank_runs(result)


#: Newlines in a row that are shown as one counted line instead.
BLANK_RUN = 3


def mark_blank_runs(text: Text) -> Text:
    """``text`` with each run of ``BLANK_RUN`` or more newlines shown as one line "⏎ ×N".

    GPT-2 sampled from the paper's prompt (a newline) can collapse into
    newlines: drawn as they are, the pane went blank, or held a word at the
    bottom of hundreds of empty rows, and looked like no sample at all.
    """
    plain = text.plain
    marked = Text()
    last = 0
    for run in re.finditer(rf"\n{{{BLANK_RUN},}}", plain):
        marked.append_text(text[last : run.start()])
        opening = "\n" if run.start() > 0 else ""
        marked.append(f"{opening}⏎ ×{len(run.group())}", style=REPEAT_STYLE)
        marked.append("\n" if run.end() < len(plain) else "")
        last = run.end()
    if not last:
        return text
    marked.append_text(text[last:])
    return marked


class SampleView(VerticalScroll):
    """A generated sample, scrollable by keyboard, loops highlighted: the latest, or a past one."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.shown: tuple[int, str] | None = None

    def compose(self) -> ComposeResult:
        yield Static("(no sample yet)", id="sample-text")

    def show(
        self, iteration: int, text: str, *, latest: int | None = None, rep4: float | None = None
    ) -> None:
        """Show iteration ``iteration``; with ``latest``, it is a past one, browsed while the run goes on.

        The text is redrawn only when it changes, so new records arriving while
        browsing (which retitle the pane) do not reset its scroll position.
        """
        if latest is None:
            self.border_title = f"sample · iteration {iteration}"
            self.border_subtitle = ""
        else:
            # at 80 columns the pane's border holds ~34 characters, and runs go to 1000 iterations;
            # "latest", not "of": iterations are numbered from 0, and "3 of 5" read as a count of 5
            self.border_title = f"iteration {iteration} (latest {latest})"
            self.border_subtitle = f"rep4 {format_rep4(rep4)} · end follows"
        if self.shown != (iteration, text):
            self.shown = (iteration, text)
            self.query_one("#sample-text", Static).update(highlight_repeats(text))
            if latest is not None:
                self.scroll_home(animate=False)  # another iteration's text: read it from its start


class EventLog(RichLog):
    """The run's recent events, one wrapped line each, wrapped again when the pane's width changes.

    Why: ``RichLog`` wraps a line once, as it is written; after a tmux split
    or an SSH window resize its lines would stay cut at the old width.
    """

    #: Lines kept (and redrawn on a resize).
    KEEP = 200

    def __init__(self, **kwargs) -> None:
        super().__init__(max_lines=self.KEEP, wrap=True, min_width=20, markup=False, **kwargs)
        self.lines_written: deque[str] = deque(maxlen=self.KEEP)
        self.wrapped_at: int | None = None

    def add(self, line: str) -> None:
        self.lines_written.append(line)
        self.write(line)

    def on_resize(self, event: events.Resize) -> None:
        width = event.size.width
        if self.wrapped_at is not None and width != self.wrapped_at:
            self.clear()
            for line in self.lines_written:
                self.write(line)
        self.wrapped_at = width


class StatusLine(Widget):
    """One line: model, device, iteration / max, it/s, lr, elapsed, remaining.

    At 80 columns the full line does not fit, so it drops its labels and
    the times' zero hours, then the device (on a GPU box nearly always
    cuda:0), then shortens the model's name (a hub id such as
    Qwen2.5-0.5B-Instruct); narrower still, the rate, then the time
    elapsed, rather than cutting off the time left.
    """

    DEFAULT_CSS = "StatusLine { height: 1; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fields: dict[str, str] = {}
        self.lr_pending = False

    def show(
        self,
        *,
        model: str,
        device: str,
        iteration: int | None,
        max_iters: int,
        rate: float | None,
        lr: float,
        pending_lr: float | None,
        elapsed: float | None,
        remaining: float | None,
    ) -> None:
        self.fields = {
            "model": model.rstrip("/").rsplit("/", 1)[-1],
            "device": device,
            # iterations done, as the headless lines count them (the sample pane names the last one's index)
            "iteration": f"it {0 if iteration is None else iteration + 1}/{max_iters}",
            "rate": format_rate(rate),
            "lr": "lr " + (fmt_lr(lr) if pending_lr is None else f"{fmt_lr(lr)}→{fmt_lr(pending_lr)}"),
            "elapsed": fmt_duration(elapsed),
            "remaining": fmt_duration(remaining),
        }
        self.lr_pending = pending_lr is not None
        self.refresh()

    @staticmethod
    def _width(parts: list[str]) -> int:
        """Characters of ``parts`` as rendered: a leading space and " · " between them."""
        return sum(map(len, parts)) + 3 * (len(parts) - 1) + 1

    def _fit(self) -> list[str]:
        """The longest form of the line that fits the widget's width."""
        f = self.fields
        width = self.size.width
        full = [f["model"], f["device"], f["iteration"], f["rate"], f["lr"], f"{f['elapsed']} elapsed"]
        full.append(f"{f['remaining']} left")
        short = [*full[:5], short_duration(f["elapsed"]), f"eta {short_duration(f['remaining'])}"]
        no_device = [short[0], *short[2:]]
        for parts in (full, short, no_device):
            if self._width(parts) <= width:
                return parts
        # Below ~75 columns (a tmux split) the model's name gives way, then the rate and the time
        # elapsed: the iteration, the lr and the time left are what a glance is for.
        no_rate = [no_device[0], no_device[1], *no_device[3:]]
        no_elapsed = [*no_rate[:3], no_rate[4]]
        for parts in (no_device, no_rate):
            room = width - self._width(parts[1:]) - 3  # what the model's name may take
            if room >= MODEL_NAME_MIN:
                return [shorten(parts[0], room), *parts[1:]]
        room = width - self._width(no_elapsed[1:]) - 3
        return [shorten(no_elapsed[0], max(room, 1)), *no_elapsed[1:]]

    def render(self) -> Text:
        if not self.fields:
            return Text("")
        line = Text(" ")
        for index, part in enumerate(self._fit()):
            if index:
                line.append(" · ", style="dim")
            style = "bold" if index == 0 or part.startswith("it ") else ""
            if part.startswith("lr "):
                style = "bold yellow" if self.lr_pending else "bold"
            line.append(part, style=style)
        return line


#: The fewest characters of the model's name the status line keeps before it drops the rate.
MODEL_NAME_MIN = 8


def short_duration(text: str) -> str:
    """An h:mm:ss time without its zero hours (0:08:14 → 8:14); "–" and times of an hour or more as they are."""
    if text.startswith("0:"):
        text = text[2:]
        return text[1:] if text.startswith("0") and len(text) == 5 else text
    return text


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class FittingFooter(Footer):
    """Textual's footer, compact (one space between keys, not two) where 80 columns are not there: a
    tmux split then shows more of the keys (quit and help come first, so they are never cut)."""

    #: The width every key's hint needs in the footer's roomy form.
    ROOMY_WIDTH = 80

    def on_resize(self, event: events.Resize) -> None:
        self.compact = event.size.width < self.ROOMY_WIDTH
