"""fanotify through ctypes: permission events on the objects the store has patches for.

A permission event holds the process that caused it inside the kernel (in ``execve`` or
``openat``) until we answer; that is the moment we attach to it. When the listener dies,
the kernel answers every pending event with "allow": nothing stays blocked.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from ..errors import CareError

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_CONTENT = 0x4
FAN_REPORT_TID = 0x100
FAN_OPEN_PERM = 0x10000
FAN_OPEN_EXEC_PERM = 0x40000
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_FLUSH = 0x80
FAN_ALLOW = 0x1
FAN_NOFD = -1
AT_FDCWD = -100
# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
EVENT = struct.Struct("=IBBHQii")
RESPONSE = struct.Struct("=iI")            # struct fanotify_response: fd, response
_READ_SIZE = 64 * EVENT.size

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = (ctypes.c_uint, ctypes.c_uint)
_libc.fanotify_mark.argtypes = (ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p)


class FanotifyError(CareError):
    """fanotify could not be set up (needs root and CONFIG_FANOTIFY_ACCESS_PERMISSIONS)."""


@dataclass(frozen=True)
class PermissionEvent:
    """One permission request: thread ``tid`` opens (or executes) the file open as ``fd``."""

    mask: int
    fd: int
    tid: int

    @property
    def is_exec(self) -> bool:
        return bool(self.mask & FAN_OPEN_EXEC_PERM)


class Fanotify:
    """One fanotify group with inode marks; events carry the thread id."""

    def __init__(self) -> None:
        fd = _libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_REPORT_TID, os.O_RDONLY | os.O_LARGEFILE
                                 | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise FanotifyError(f"fanotify_init failed: {os.strerror(code)} (needs root and a kernel with "
                                f"CONFIG_FANOTIFY_ACCESS_PERMISSIONS)")
        self.fd = fd

    def mark(self, path: str, mask: int) -> None:
        """Ask for ``mask`` events on the inode at ``path``."""
        self._mark(FAN_MARK_ADD, mask, path)

    def unmark(self, path: str, mask: int) -> None:
        """Stop ``mask`` events on the inode at ``path`` (gone files are fine)."""
        try:
            self._mark(FAN_MARK_REMOVE, mask, path)
        except FanotifyError:
            pass

    def _mark(self, flags: int, mask: int, path: str) -> None:
        if _libc.fanotify_mark(self.fd, flags, mask, AT_FDCWD, os.fsencode(path)) != 0:
            code = ctypes.get_errno()
            raise FanotifyError(f"fanotify_mark {path}: {os.strerror(code)}")

    def read_events(self) -> list[PermissionEvent]:
        """The events waiting (blocks until there is at least one)."""
        data = os.read(self.fd, _READ_SIZE)
        events = []
        offset = 0
        while offset + EVENT.size <= len(data):
            length, _version, _reserved, _meta, mask, fd, tid = EVENT.unpack_from(data, offset)
            if length < EVENT.size:
                break
            events.append(PermissionEvent(mask, fd, tid))
            offset += length
        return events

    def allow(self, event: PermissionEvent) -> None:
        """Let the blocked open (or exec) go on, and close the event's file."""
        if event.fd == FAN_NOFD:
            return
        try:
            os.write(self.fd, RESPONSE.pack(event.fd, FAN_ALLOW))
        finally:
            os.close(event.fd)

    def close(self) -> None:
        """Close the group: the kernel allows whatever is still pending."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
