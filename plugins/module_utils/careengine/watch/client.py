"""The command line's side of the control socket.

``libcare-ctl patch/unpatch/info`` go through the service when its socket exists: the
launcher runs this file directly with ``python -S`` (no site, no engine: ``_socket``,
``struct`` and ``os`` only), and :func:`..cli.main` calls :func:`forward` for the other
spellings. When no service answers, the command runs locally as before.
"""

from __future__ import annotations

import _socket
import os
import sys

try:
    from . import protocol
except ImportError:                        # run as a script: this directory is sys.path[0]
    import protocol  # type: ignore[no-redef]


def socket_path() -> str:
    """Where the service listens (``$LIBCARE_SOCKET``, else the default)."""
    return os.environ.get(protocol.SOCKET_ENV) or protocol.DEFAULT_SOCKET


def _command(argv: list[str]) -> str | None:
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def request(argv: list[str], path: str | None = None, timeout: float | None = None) -> tuple[int, str, str] | None:
    """Send ``argv`` to the service: (exit status, stdout, stderr), or None when there is no
    service to ask."""
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout)
        connection.connect(path or socket_path())
    except OSError:
        connection.close()
        return None
    try:
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = "/"
        connection.sendall(protocol.encode_request(cwd, argv))
        connection.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = connection.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        connection.close()
    try:
        return protocol.decode_answer(b"".join(chunks))
    except ValueError:
        return 1, "", "libcare-ctl: the service closed the connection without a whole answer\n"


def print_answer(answer: tuple[int, str, str]) -> int:
    """Print the service's answer as the command would have; its exit status."""
    exit_status, out, err = answer
    sys.stdout.write(out)
    sys.stdout.flush()
    sys.stderr.write(err)
    sys.stderr.flush()
    return exit_status


def forward(argv: list[str]) -> int | None:
    """Run ``libcare-ctl argv`` through the service if it is one of its commands and the
    socket answers; the exit status, or None to run locally."""
    if _command(argv) not in protocol.FORWARDED_COMMANDS or os.environ.get(protocol.NO_SERVICE_ENV):
        return None
    path = socket_path()
    if not os.path.exists(path):
        return None
    answer = request(argv, path)
    return None if answer is None else print_answer(answer)


def _run_locally(argv: list[str]) -> None:
    """No service answers: run the full command line instead (it will not ask again)."""
    launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 4, "bin", "libcare-ctl")
    os.environ[protocol.NO_SERVICE_ENV] = "1"
    os.execv(launcher, [launcher, *argv])


if __name__ == "__main__":
    status = forward(sys.argv[1:])
    if status is None:
        _run_locally(sys.argv[1:])
    sys.exit(status)
