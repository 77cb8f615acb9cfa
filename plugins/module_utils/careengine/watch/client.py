"""The command line's side of the control socket (socket and json only: no engine import).

``libcare-ctl patch/unpatch/info`` call :func:`forward` first: when the service's socket
exists and answers, the request runs there (a few milliseconds: no Python start-up of the
engine); otherwise they run locally as before.
"""

from __future__ import annotations

import os
import socket
import sys

from . import protocol


def socket_path() -> str:
    """Where the service listens (``$LIBCARE_SOCKET``, else the default)."""
    return os.environ.get(protocol.SOCKET_ENV) or protocol.DEFAULT_SOCKET


def _command(argv: list[str]) -> str | None:
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def request(argv: list[str], path: str | None = None, timeout: float | None = None) -> dict | None:
    """Send ``argv`` to the service; its answer, or None when there is no service to ask."""
    path = path or socket_path()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout)
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    with connection:
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = "/"
        connection.sendall(protocol.encode({"argv": argv, "cwd": cwd}))
        line = protocol.receive_line(connection)
    if not line:
        return {"exit": 1, "stdout": "", "stderr": "libcare-ctl: the service closed the connection without an answer\n"}
    return protocol.decode(line)


def print_answer(answer: dict) -> int:
    """Print the service's answer as the command would have; its exit status."""
    sys.stdout.write(answer.get("stdout", ""))
    sys.stdout.flush()
    sys.stderr.write(answer.get("stderr", ""))
    return int(answer.get("exit", 1))


def forward(argv: list[str]) -> int | None:
    """Run ``libcare-ctl argv`` through the service if it is one of its commands and the
    socket answers; the exit status, or None to run locally."""
    if _command(argv) not in protocol.FORWARDED_COMMANDS or os.environ.get("LIBCARE_NO_SERVICE"):
        return None
    path = socket_path()
    if not os.path.exists(path):
        return None
    answer = request(argv, path)
    if answer is None:
        return None
    return print_answer(answer)
