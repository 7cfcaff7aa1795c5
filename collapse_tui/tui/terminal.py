"""The TUI's hold on its terminal, made safe for the terminal going away (an SSH session dropped).

Textual writes the screen from a thread through a bounded queue. When the
terminal hangs up, its first write fails (EIO), the thread dies, and the next
writes (the screen restored on exit, say) fill the queue and block forever:
the process would never end, though its run had stopped and been saved. So
the driver's output is wrapped to go quiet once a write fails, and on a
hang-up that took the terminal the process's output is pointed at /dev/null.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import IO, Any

try:
    import termios
except ImportError:  # Windows: no hang-ups to tell apart
    termios = None  # type: ignore[assignment]

from textual.driver import Driver


class QuietOnceGone:
    """A text stream that forwards to ``stream`` until a write or flush fails, then drops everything."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except (OSError, ValueError):  # EIO from a hung-up terminal; ValueError: the stream was closed
                self.gone = True
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.gone = True

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, …
        return getattr(self.stream, name)


def hangup_safe(driver_class: type[Driver]) -> type[Driver]:
    """``driver_class`` with its output wrapped in ``QuietOnceGone`` (drivers that write to ``_file``)."""

    class HangupSafeDriver(driver_class):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            file = getattr(self, "_file", None)
            if file is not None and not isinstance(file, QuietOnceGone):
                self._file = QuietOnceGone(file)

    HangupSafeDriver.__name__ = HangupSafeDriver.__qualname__ = f"HangupSafe{driver_class.__name__}"
    return HangupSafeDriver


def terminal_gone() -> bool:
    """Whether the terminal has hung up (its attributes give EIO), as opposed to a ``kill -HUP`` of a
    process whose terminal is still there, which must get its screen restored."""
    if termios is None:
        return False
    for stream in (sys.__stderr__, sys.__stdout__):
        try:
            termios.tcgetattr(stream.fileno())
        except termios.error as error:
            if error.args and error.args[0] == errno.EIO:
                return True
        except (AttributeError, OSError, ValueError):
            continue
    return False


def silence_output() -> None:
    """Point stdout and stderr at /dev/null: after a hang-up nothing can reach the user, and a write
    to the dead terminal would fail (or, through Textual's writer thread, block)."""
    with contextlib.suppress(OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(null, stream.fileno())
        os.close(null)


#: What leaves the screen's modes, as Textual's driver does when the app ends: mouse reports, bracketed
#: paste, the kitty keyboard protocol and focus reports off; line wrap on; the alternate screen left; the
#: cursor shown.
LEAVE_SCREEN = (
    "\x1b[?1000l\x1b[?1003l\x1b[?1015l\x1b[?1006l\x1b[?2004l\x1b[?2048l\x1b[?7h\x1b[<u"
    "\x1b[?1049l\x1b[?25h\x1b[?1004l"
)


def restore_terminal(driver: Driver | None) -> None:
    """Give the terminal back as it was before the screen, at once: for a process about to die of a signal.

    Why: a second ``kill -INT`` leaves at once (a run stuck saving its
    snapshot), by the signal's own action, which skips Textual's way out; the
    shell was then left in the screen's raw mode and alternate screen, with
    no echo, until ``reset``. Written straight to the terminal (not through
    the driver's writer thread), and quiet if it is gone. ``_file`` is the
    driver's own (private) name for the stream it draws on; stderr, where
    Textual draws, if a release renames it.
    """
    keys = getattr(driver, "fileno", None)  # the terminal Textual reads keys from (stdin): its modes
    screen = getattr(driver, "_file", None) or sys.__stderr__  # the one it draws on (stderr)
    if driver is None or screen is None or terminal_gone():
        return
    attrs = getattr(driver, "attrs_before", None)
    with contextlib.suppress(OSError, ValueError):
        if termios is not None and isinstance(keys, int) and attrs is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(keys, termios.TCSANOW, attrs)
        os.write(screen.fileno(), LEAVE_SCREEN.encode())
