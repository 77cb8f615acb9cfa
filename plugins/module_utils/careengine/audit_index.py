"""The audit log's index of applied patches, kept between calls in this process and brought
up to date with only the lines appended since.

``libcare-ctl info`` and ``unpatch`` look up when and by whom each patch was applied
(:func:`.audit.index_applied`). Read from the start on every request, as a command line
does once, the log cost the resident service 5 ms per 1,500 records, and it only grows
between rotations. Here each file is known by its identity: the rotated ``PATH.1`` by
device, inode, size and mtime, ``PATH`` by device and inode, the length already read
(whole lines only) and its first and last bytes, read again; anything else (rotated again,
replaced, truncated, rewritten) is read from the start again. Entries of processes that are
gone are dropped once the index is large.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .audit import AuditLog, applied_record, index_applied, process_facts
from .results import ProcessInfo

PRUNE_ABOVE = 4096            # index entries before those of exited processes are dropped
EDGE_SIZE = 256               # bytes at the start and before the offset read again: the same file?


@dataclass
class _Progress:
    """How far one log has been indexed."""

    rotated: tuple[int, int, int, int] | None     # (device, inode, size, mtime ns) of PATH.1
    current: tuple[int, int] | None               # (device, inode) of PATH
    offset: int = 0                               # bytes of PATH indexed, whole lines only
    index: dict[tuple, dict] = field(default_factory=dict)
    head: bytes = b""                             # the first EDGE_SIZE of those bytes
    tail: bytes = b""                             # and the last


_progress: dict[str, _Progress] = {}


def _status(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _records(data: bytes) -> Iterator[dict]:
    """The records of JSON lines ``data`` (bad lines skipped, as :meth:`AuditLog.records` does)."""
    for line in data.splitlines():
        try:
            record = json.loads(line.decode("utf-8", "replace"))
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def _read_from(path: str, offset: int, size: int = -1) -> bytes:
    if size == 0:
        return b""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            return stream.read(size)
    except OSError:
        return b""


def _start_over(path: str, rotated: tuple[int, int, int, int] | None,
                current: tuple[int, int] | None) -> _Progress:
    return _Progress(rotated, current, 0, index_applied(_records(_read_from(path + ".1", 0))))


def _prune(index: dict[tuple, dict]) -> None:
    """Drop the entries of processes that exited (their pid and start no longer match)."""
    starts: dict[int, int | None] = {}
    for key in list(index):
        pid, start = key[0], key[1]
        if pid not in starts:
            starts[pid] = process_facts(pid).start if isinstance(pid, int) else None
        if starts[pid] is None or starts[pid] != start:
            del index[key]


def applied_index(log: AuditLog) -> dict[tuple, dict]:
    """:func:`.audit.index_applied` of every record of ``log`` (a copy), reading only what
    was appended since the last call in this process for the same files."""
    path = os.path.abspath(log.path)
    rotated_status, current_status = _status(path + ".1"), _status(path)
    rotated = None if rotated_status is None else (rotated_status.st_dev, rotated_status.st_ino,
                                                   rotated_status.st_size, rotated_status.st_mtime_ns)
    current = None if current_status is None else (current_status.st_dev, current_status.st_ino)
    progress = _progress.get(path)
    if progress is None or (progress.rotated, progress.current) != (rotated, current):
        progress = _progress[path] = _start_over(path, rotated, current)
    if current is not None:
        _read_appended(path, progress)
    if len(progress.index) > PRUNE_ABOVE:
        _prune(progress.index)
    return dict(progress.index)


def _read_appended(path: str, progress: _Progress) -> None:
    """Index the whole lines appended to ``path`` since ``progress`` (every line again if the
    bytes it began or ended with are not there any more)."""
    data = _read_from(path, progress.offset - len(progress.tail))
    if not data.startswith(progress.tail) or _read_from(path, 0, len(progress.head)) != progress.head:
        fresh = _start_over(path, progress.rotated, progress.current)      # truncated or rewritten
        progress.offset, progress.index, progress.head, progress.tail = 0, fresh.index, b"", b""
        data = _read_from(path, 0)
    appended = data[len(progress.tail):]
    whole = appended[:appended.rfind(b"\n") + 1]                # a line still being written waits
    progress.index.update(index_applied(_records(whole)))
    if len(progress.head) < EDGE_SIZE:
        progress.head = (progress.head + whole)[:EDGE_SIZE]
    progress.offset += len(whole)
    progress.tail = (progress.tail + whole)[-EDGE_SIZE:]


def applied_history(infos: Iterable[ProcessInfo], audit_log: str | None) -> dict[tuple, dict]:
    """(pid, build-id, level) -> the audit record of when that applied patch was applied
    (``libcare-ctl info`` and ``livepatch_info``). Only for patches in force and with a
    record; an unreadable or missing log gives none."""
    wanted = [(i.pid, o.build_id, o.applied_level) for i in infos for o in i.objects if o.applied_level is not None]
    if not wanted:
        return {}
    index = applied_index(AuditLog(audit_log, to_syslog=False))
    history = {}
    for key in wanted:
        record = applied_record(index, *key)
        if record is not None:
            history[key] = record
    return history
