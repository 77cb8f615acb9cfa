"""The control socket: root's, and every connection checked with the peer's credentials.

Mode 0600 (root only), or 0660 with ``socket_group`` (its members may connect: ``info``
and ``watch --status``, each seeing only their own processes). ``patch`` and ``unpatch``
are for root and the members of ``operator_group`` only. A refused request gets a one-line
reason and is logged.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
import struct
from dataclasses import dataclass

from ..errors import CareError
from ..process.maps import proc_status
from . import protocol

_UCRED = struct.Struct("3i")
PRIVILEGED_COMMANDS = frozenset({"patch", "unpatch", "patch-user", "unpatch-user"})


class SocketError(CareError):
    """The control socket cannot be created (another service running? bad group?)."""


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int

    def groups(self) -> set[int]:
        """Its primary and supplementary groups (from ``/proc/PID/status``)."""
        return {self.gid, *(int(g) for g in proc_status(self.pid).get("Groups", "").split())}

    def describe(self) -> str:
        return f"uid {self.uid} (pid {self.pid})"


def group_id(name: str | None) -> int | None:
    """The id of group ``name`` (a name or a number), None for no group."""
    if not name:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SocketError(f"no group named {name!r}") from None


def ensure_free(path: str) -> None:
    """Remove a socket left at ``path`` by a service that died; refuse if one listens there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)                      # nobody listens: left by a service that died
        return
    finally:
        probe.close()
    raise SocketError(f"a service already listens on {path}")


class ControlSocket:
    """The listening socket at ``path``."""

    def __init__(self, path: str, socket_group: str | None = None, operator_group: str | None = None) -> None:
        self.path = path
        self.socket_gid = group_id(socket_group)
        self.operator_gid = group_id(operator_group)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        ensure_free(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)          # never a moment with a wider mode
        try:
            self.listener.bind(path)
        finally:
            os.umask(old_umask)
        if self.socket_gid is not None:
            os.chown(path, 0, self.socket_gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        self.listener.listen(64)

    def fileno(self) -> int:
        return self.listener.fileno()

    def accept(self) -> tuple[socket.socket, Peer]:
        """The next connection and its peer."""
        connection, _ = self.listener.accept()
        pid, uid, gid = _UCRED.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return connection, Peer(pid, uid, gid)

    def may_change(self, peer: Peer) -> bool:
        """True if ``peer`` may patch and unpatch."""
        return peer.uid == 0 or (self.operator_gid is not None and self.operator_gid in peer.groups())

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def receive_request(connection: socket.socket) -> tuple[str, list[str]]:
    """(cwd, argv) of the request on ``connection``; ValueError if malformed or too long."""
    data = b""
    while True:
        size = protocol.request_size(data)
        if size is not None and len(data) >= size:
            return protocol.decode_request(data[:size])
        if len(data) > protocol.MAX_MESSAGE:
            raise ValueError("request too long")
        chunk = connection.recv(1 << 16)
        if not chunk:
            return protocol.decode_request(data)
        data += chunk


def answer(connection: socket.socket, exit_status: int, stdout: str = "", stderr: str = "") -> None:
    """Send one answer; a client that went away is not an error of ours."""
    with contextlib.suppress(OSError):
        connection.sendall(protocol.encode_answer(exit_status, stdout, stderr))
