"""The two modal screens: help, and typing a learning rate."""

from __future__ import annotations

import math
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

#: The keys that steer the run: a read-only watcher's help leaves them out.
STEERING_KEYS = [
    ("space, p", "pause / resume (at the end of the iteration in flight)"),
    ("+", "double the learning rate from the next iteration"),
    ("-", "halve the learning rate from the next iteration"),
    ("l", "type a learning rate"),
    ("s", "snapshot: model, optimizer, sample, and an SVG of this screen (once the run has ended: the SVG)"),
]
HISTORY_KEYS = [
    ("[ ]", "previous / next iteration's sample (▲ on the charts)"),
    ("{ }", "10 iterations back / forward"),
    ("home", "the first iteration"),
    ("end", "back to following the latest iteration"),
    ("↑ ↓ pgup pgdn", "scroll the sample (tab moves focus)"),
]


#: What is left to do to a run that has ended, on its screen.
ENDED_KEYS = [("s", "save this screen as an SVG into the run's last snapshot (or its folder)")]


def help_keys(
    *, stops_the_run: bool = True, read_only: bool = False, ended: bool = False
) -> list[tuple[str, str]]:
    """The help's key list for this screen: a watcher's q leaves the run going, a read-only one cannot
    steer, and a run that has ended takes no steering at all."""
    if ended:
        steering, quit_row = ENDED_KEYS, ("q", "quit (the run has ended)")
    else:
        steering = STEERING_KEYS
        quit_row = (
            ("q", "stop the run (its folder is completed) and quit")
            if stops_the_run
            else ("q", "stop watching and quit (the run goes on)")
        )
    return [*([] if read_only else steering), *HISTORY_KEYS, quit_row, ("?", "this help")]


class HelpScreen(ModalScreen[None]):
    """What each key does, and what the panes mean."""

    BINDINGS: ClassVar[list[Binding]] = [
        Binding("escape,question_mark", "dismiss", "Close", key_display="esc"),
        Binding("q", "quit_run", "Quit"),
    ]

    def __init__(self, keys: list[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.keys = keys or help_keys()

    async def action_quit_run(self) -> None:
        """q quits from here too, as the list above says; the run stops as it would from the main screen."""
        self.dismiss()
        await self.app.run_action("quit")

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for key, what in self.keys:
            table.add_row(key, what)
        # scrolls where the terminal is too short for it (a tmux status bar takes a row)
        with VerticalScroll(id="help-box") as box:
            box.border_title = "collapse-tui · keys"
            yield Static(table)
            yield Static(
                "rep4: share of repeated 4-grams in the latest sample (the │ marks the collapse "
                "threshold). Highlighted text in the sample lies inside a repeated run of 4 words "
                "(or marks, or units of a letter loop). "
                "Changes apply at the next iteration and show in the event log.",
                id="help-notes",
            )
            yield Label("esc or ? closes", classes="hint")


#: The highest learning rate the keys accept: beyond it a step only destroys the weights.
MAX_LR = 1.0


def parse_lr(text: str, current: float = 0.0) -> float:
    """A learning rate typed by a user; ValueError says what is wrong with it.

    The ceiling is ``MAX_LR``, or the ``current`` rate where a run was started
    above it with ``--lr``: its own value, or a lower one, is taken then.
    """
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"not a number: {text.strip()!r} (try 4e-5)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("the learning rate must be a positive number")
    ceiling = max(MAX_LR, current)
    if value > ceiling:
        raise ValueError(f"above {MAX_LR:g} the update only wrecks the model; type at most {ceiling:g}")
    return value


def lr_text(lr: float) -> str:
    """``lr`` as short as it reads back exactly (``4e-05``, not ``4.0000000000000003e-05``)."""
    short = f"{lr:g}"
    return short if float(short) == lr else repr(lr)


class LrScreen(ModalScreen[float | None]):
    """A one-line dialog for a learning rate; a bad value is refused with the reason shown in place."""

    BINDINGS: ClassVar[list[Binding]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: float, *, running: float | None = None) -> None:
        """``current`` is what the next iteration will use (the field starts on it); ``running`` the
        lr of the iteration in flight where an asked-for one has not been applied yet."""
        super().__init__()
        self.current = current
        self.running = running

    def compose(self) -> ComposeResult:
        with Vertical(id="lr-box") as box:
            box.border_title = "learning rate"
            now = f"now {self.current:.3g}"
            if self.running is not None and self.running != self.current:
                now = f"now {self.running:.3g}, {self.current:.3g} asked for"
            yield Label(f"{now}; applies from the next iteration")
            # exact, so that enter on it gives back this very rate (a rounded 1.23457 could be above it)
            yield Input(value=lr_text(self.current), id="lr-input", select_on_focus=True)
            yield Label("", id="lr-error")
            yield Label("enter applies · esc cancels", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            value = parse_lr(event.value, self.current)
        except ValueError as error:
            self.query_one("#lr-error", Label).update(Text(str(error)))  # it quotes what was typed
            self.query_one("#lr-input", Input).add_class("-invalid")
            return
        self.dismiss(value)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#lr-error", Label).update("")
        event.input.remove_class("-invalid")

    def action_cancel(self) -> None:
        self.dismiss(None)
