"""Unit counts from the wrapper's progress file and how they are shown."""

from __future__ import annotations

import io

from plugins.module_utils.careengine.patchbuild import progress


def test_counter_reads_only_what_was_appended(tmp_path, monkeypatch):
    path = tmp_path / "progress"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(path))
    counter = progress.UnitCounter(str(path))
    assert counter.read() == progress.UnitCounts()
    progress.note_unit(progress.COMPILED, "a")
    progress.note_unit(progress.COMPILED, "b")
    progress.note_unit(progress.DIFFED, "changed")
    assert counter.read() == progress.UnitCounts(2, 1, 1)
    with open(path, "ab") as stream:
        stream.write(b"diffed sa")                               # a line still being written
    assert counter.read() == progress.UnitCounts(2, 1, 1)
    with open(path, "ab") as stream:
        stream.write(b"me\n")
    assert counter.read() == progress.UnitCounts(2, 2, 1)


def test_note_unit_outside_a_driven_build_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    progress.note_unit(progress.COMPILED, "a")
    assert list(tmp_path.iterdir()) == []


def test_describe():
    assert progress.describe(progress.UnitCounts(12), 83.0, 40) == "12/40 units compiled, 1:23"
    assert progress.describe(progress.UnitCounts(3, 3, 1), 5.0) == "3 units compiled, 3 diffed (1 changed), 0:05"


def test_terminal_gets_a_live_line_and_logs_plain_lines():
    terminal = io.StringIO()
    live = progress.Reporter("tool", terminal, live=True)
    live.tick("make", progress.UnitCounts(1), 1.0)
    live.tick("make", progress.UnitCounts(2), 2.0)
    live("stage patched: make")
    assert terminal.getvalue() == ("\r\x1b[Ktool: make: 1 unit compiled, 0:01\r\x1b[Ktool: make: 2 units compiled, 0:02"
                                   "\r\x1b[Ktool: stage patched: make\n")
    log = io.StringIO()
    plain = progress.Reporter("tool", log, live=False, interval=3600)
    plain.tick("make", progress.UnitCounts(1), 1.0)              # within the interval: no line
    plain.done("make", progress.UnitCounts(3), 3.0)
    assert log.getvalue() == "tool: make: 3 units compiled, 0:03\n"
    every = io.StringIO()
    chatty = progress.Reporter("tool", every, live=False, interval=0)
    chatty.tick("make", progress.UnitCounts(1), 1.0)
    chatty.tick("make", progress.UnitCounts(2), 2.0)
    assert every.getvalue() == "tool: make: 1 unit compiled, 0:01\ntool: make: 2 units compiled, 0:02\n"
    assert "\r" not in log.getvalue() + every.getvalue()


def test_quiet_shows_nothing():
    stream = io.StringIO()
    quiet = progress.Reporter("tool", stream, quiet=True, live=True)
    quiet("stage original: make")
    quiet.tick("make", progress.UnitCounts(1), 1.0)
    quiet.done("make", progress.UnitCounts(1), 1.0)
    assert stream.getvalue() == ""
