"""The address space of a process as ``/proc/PID/maps`` describes it.

:func:`parse_maps` and :func:`free_holes` are pure; :func:`read_maps` is the only reader.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ..errors import PermissionDenied, ProcessError, ProcessGone

PAGE_SIZE = 4096
DELETED_SUFFIX = " (deleted)"


def page_down(address: int) -> int:
    """``address`` rounded down to a page boundary."""
    return address & ~(PAGE_SIZE - 1)


def page_up(address: int) -> int:
    """``address`` rounded up to a page boundary."""
    return (address + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``: a range ``[start, end)`` of the address space."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def size(self) -> int:
        """Length of the range in bytes."""
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[:1] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1:2] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2:3] == "x"

    @property
    def is_file(self) -> bool:
        """Backed by a file (not anonymous, not ``[heap]``/``[stack]``/...)."""
        return self.inode != 0 and self.path.startswith("/")

    @property
    def deleted(self) -> bool:
        """The backing file was removed or replaced since it was mapped."""
        return self.path.endswith(DELETED_SUFFIX)

    @property
    def clean_path(self) -> str:
        """The path without the kernel's ``" (deleted)"`` suffix."""
        if self.deleted:
            return self.path[: -len(DELETED_SUFFIX)]
        return self.path

    def contains(self, address: int) -> bool:
        """True if ``address`` lies in ``[start, end)``."""
        return self.start <= address < self.end


def parse_maps(text: str) -> list[Mapping]:
    """The mappings described by the text of a ``/proc/PID/maps`` file, in file order."""
    mappings = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split(None, 5)
        if len(fields) < 5:
            raise ProcessError(f"malformed /proc/PID/maps line: {line!r}")
        address_range, perms, offset, dev, inode = fields[:5]
        # The path is everything after the inode column; it may contain spaces.
        path = fields[5].strip() if len(fields) > 5 else ""
        start_text, _, end_text = address_range.partition("-")
        try:
            mappings.append(
                Mapping(
                    start=int(start_text, 16),
                    end=int(end_text, 16),
                    perms=perms,
                    offset=int(offset, 16),
                    dev=dev,
                    inode=int(inode),
                    path=path,
                )
            )
        except ValueError:
            raise ProcessError(f"malformed /proc/PID/maps line: {line!r}") from None
    return mappings


def proc_status(pid: int, tid: int | None = None) -> dict[str, str]:
    """The fields of ``/proc/PID/status`` (of thread ``tid`` if given): name -> value, with
    surrounding white space removed; empty when it cannot be read (the process is gone)."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        with open(path, encoding="ascii", errors="replace") as stream:
            return {name: value.strip() for name, _, value in (line.partition(":") for line in stream)}
    except OSError:
        return {}


def read_proc_text(pid: int, name: str) -> str:
    """The text of ``/proc/PID/<name>``, with errors turned into engine errors."""
    try:
        with open(f"/proc/{pid}/{name}", encoding="utf-8", errors="surrogateescape") as stream:
            return stream.read()
    except FileNotFoundError:
        raise ProcessGone(f"process {pid} does not exist") from None
    except PermissionError:
        raise PermissionDenied(
            f"may not read /proc/{pid}/{name}: run as root or with CAP_SYS_PTRACE"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessGone(f"process {pid} does not exist") from None
        raise ProcessError(f"cannot read /proc/{pid}/{name}: {exc.strerror}") from None


def live_thread(pid: int) -> int | None:
    """A thread of ``pid`` that still has the address space, when the main thread exited.

    A process whose main thread called ``pthread_exit`` keeps running in its other
    threads, but ``/proc/PID/maps`` and ``/proc/PID/mem`` of the (zombie) leader are empty.
    """
    try:
        tids = sorted(int(name) for name in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None
    for tid in tids:
        if tid == pid:
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stream:
                stat = stream.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X"):
            return tid
    return None


def read_maps(pid: int) -> list[Mapping]:
    """The current mappings of process ``pid``."""
    text = read_proc_text(pid, "maps")
    if not text:
        # The main thread exited (the others may run on) or the whole process is a zombie.
        tid = live_thread(pid)
        if tid is not None:
            text = read_proc_text(pid, f"task/{tid}/maps")
        if not text:
            raise ProcessGone(f"process {pid} has no address space (it exited)")
    return parse_maps(text)


def free_holes(
    mappings: list[Mapping], low: int = 0x10000, high: int = 0x7FFF_FFFF_F000
) -> list[tuple[int, int]]:
    """The unmapped gaps ``[start, end)`` between ``mappings`` within ``[low, high)``.

    Bounds are page aligned (start rounded up, end rounded down); empty gaps are dropped.
    ``mappings`` need not be sorted.
    """
    holes = []
    cursor = page_up(low)
    limit = page_down(high)
    for mapping in sorted(mappings, key=lambda m: m.start):
        if mapping.end <= cursor:
            continue
        if mapping.start >= limit:
            break
        gap_end = page_down(mapping.start)
        if gap_end > cursor:
            holes.append((cursor, gap_end))
        cursor = max(cursor, page_up(mapping.end))
    if limit > cursor:
        holes.append((cursor, limit))
    return holes
