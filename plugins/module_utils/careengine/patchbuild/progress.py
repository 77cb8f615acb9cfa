"""What a long build is doing: units compiled and diffed, out of the total, and the time.

The compiler wrapper appends one short line per unit to the file named by
``$LPMAKE_PROGRESS_FILE`` (:func:`note_unit`: one ``O_APPEND`` write, safe from parallel
compilers); the driver counts them while the build runs (:class:`UnitCounter`) and a
:class:`Reporter` shows them: a live line rewritten in place on a terminal, a plain line
every :data:`LOG_INTERVAL` seconds otherwise (logs), nothing with ``quiet``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

PROGRESS_ENV = "LPMAKE_PROGRESS_FILE"
LOG_INTERVAL = 15.0
COMPILED = "compiled"
DIFFED = "diffed"
# A changed unit without debug information: its types' layouts could not be compared.
UNCHECKED_LAYOUT = "unchecked-layout"


def note_unit(event: str, detail: str = "") -> None:
    """Record one unit event (``compiled``, ``diffed``, ``unchecked-layout``) for the driver; no-op
    outside a driven build."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        os.write(descriptor, f"{event} {detail}".rstrip().encode() + b"\n")
    except OSError:
        pass
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class UnitCounts:
    """Units compiled and diffed so far in a stage (changed: the diff found changes;
    unchecked_layouts: changed units whose type layouts could not be compared, no ``-g``)."""

    compiled: int = 0
    diffed: int = 0
    changed: int = 0
    unchecked_layouts: tuple[str, ...] = ()


class UnitCounter:
    """Counts the lines of a progress file, reading only what was appended since last time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.compiled = 0
        self.diffed = 0
        self.changed = 0
        self.unchecked_layouts: list[str] = []

    def read(self) -> UnitCounts:
        try:
            with open(self.path, "rb") as stream:
                stream.seek(self._offset)
                chunk = stream.read()
        except FileNotFoundError:
            chunk = b""
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            event, _, detail = line.decode(errors="replace").partition(" ")
            if event == COMPILED:
                self.compiled += 1
            elif event == DIFFED:
                self.diffed += 1
                self.changed += detail == "changed"
            elif event == UNCHECKED_LAYOUT:
                self.unchecked_layouts.append(detail)
        return UnitCounts(self.compiled, self.diffed, self.changed, tuple(self.unchecked_layouts))


def describe(counts: UnitCounts, elapsed: float, total: int | None = None) -> str:
    """``12/40 units compiled, 3 diffed (1 changed), 0:23``."""
    compiled = f"{counts.compiled}/{total}" if total and total >= counts.compiled else f"{counts.compiled}"
    text = f"{compiled} unit{'s' if (total or counts.compiled) != 1 else ''} compiled"
    if counts.diffed:
        text += f", {counts.diffed} diffed ({counts.changed} changed)"
    minutes, seconds = divmod(int(elapsed), 60)
    return f"{text}, {minutes}:{seconds:02d}"


class Reporter:
    """Stage messages and live counts for a person (terminal) or a log (plain lines)."""

    def __init__(self, prog: str, stream: TextIO | None = None, *, quiet: bool = False,
                 live: bool | None = None, interval: float = LOG_INTERVAL) -> None:
        self.prog = prog
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = self.stream.isatty() if live is None else live
        self.interval = interval
        self._live_shown = False
        self._last_plain = time.monotonic()

    def __call__(self, message: str) -> None:
        """One stage message on its own line."""
        self._last_plain = time.monotonic()
        if self.quiet:
            return
        self._clear_live()
        self.stream.write(f"{self.prog}: {message}\n")
        self.stream.flush()

    def tick(self, what: str, counts: UnitCounts, elapsed: float, total: int | None = None) -> None:
        """The counts of the running step: rewritten in place, or a line every ``interval`` seconds."""
        if self.quiet:
            return
        text = f"{self.prog}: {what}: {describe(counts, elapsed, total)}"
        if self.live:
            self.stream.write("\r\x1b[K" + text)
            self._live_shown = True
            self.stream.flush()
            return
        now = time.monotonic()
        if now - self._last_plain >= self.interval:
            self._last_plain = now
            self.stream.write(text + "\n")
            self.stream.flush()

    def done(self, what: str, counts: UnitCounts, elapsed: float, total: int | None = None) -> None:
        """The final counts of a step (always one plain line when anything was compiled)."""
        self._last_plain = time.monotonic()
        if self.quiet:
            return
        self._clear_live()
        if counts.compiled or counts.diffed:
            self.stream.write(f"{self.prog}: {what}: {describe(counts, elapsed, total)}\n")
            self.stream.flush()

    def _clear_live(self) -> None:
        if self._live_shown:
            self.stream.write("\r\x1b[K")
            self._live_shown = False
