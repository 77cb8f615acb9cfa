"""The command line's side of the control socket.

``libcare-ctl patch/unpatch/info`` go through the service when its socket exists: the
launcher starts ``python -I -S`` on :mod:`.client_main`, which calls :func:`main` here;
:func:`..cli.main` calls :func:`forward` for the other spellings. When no service answers,
the command runs locally as before.

Every import is built into the interpreter (``_socket``, ``posix``: what ``os`` wraps,
``sys``) but :mod:`.protocol`, which imports nothing: ``os`` alone would cost a millisecond
of the client's start (see docs/PERFORMANCE.md).
"""

import _socket
import posix
import sys

try:
    from . import protocol
except ImportError:                        # run by client_main: this directory is on sys.path
    import protocol  # type: ignore[no-redef]

RECEIVE_SIZE = 1 << 16


def _environment(name: str) -> str | None:
    value = posix.environ.get(name.encode())
    return None if value is None else value.decode("utf-8", "surrogateescape")


def socket_path() -> str:
    """Where the service listens (``$LIBCARE_SOCKET``, else the default)."""
    return _environment(protocol.SOCKET_ENV) or protocol.DEFAULT_SOCKET


def _command(argv: list[str]) -> str | None:
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def _working_directory() -> str:
    try:
        return posix.getcwd()
    except OSError:
        return "/"


def exchange(argv: list[str], path: str | None = None, timeout: float | None = None) -> bytes | None:
    """Send ``argv`` to the service: the raw answer, or None when there is no service to ask."""
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout)
        connection.connect(path or socket_path())
    except OSError:
        connection.close()
        return None
    try:
        connection.sendall(protocol.encode_request(_working_directory(), argv))
        connection.shutdown(_socket.SHUT_WR)
        chunks = []
        while chunk := connection.recv(RECEIVE_SIZE):
            chunks.append(chunk)
    finally:
        connection.close()
    return b"".join(chunks)


def _split(raw: bytes) -> tuple[int, bytes, bytes]:
    try:
        return protocol.split_answer(raw)
    except ValueError:
        return 1, b"", b"libcare-ctl: the service closed the connection without a whole answer\n"


def request(argv: list[str], path: str | None = None, timeout: float | None = None) -> tuple[int, str, str] | None:
    """Send ``argv`` to the service: (exit status, stdout, stderr), or None when there is no
    service to ask."""
    raw = exchange(argv, path, timeout)
    if raw is None:
        return None
    exit_status, out, err = _split(raw)
    return exit_status, out.decode("utf-8", "surrogateescape"), err.decode("utf-8", "surrogateescape")


def _write_all(stream, data: bytes) -> None:
    if data:
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()


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
    if _command(argv) not in protocol.FORWARDED_COMMANDS or _environment(protocol.NO_SERVICE_ENV):
        return None
    raw = exchange(argv, socket_path())
    if raw is None:
        return None
    exit_status, out, err = _split(raw)
    _write_all(sys.stdout, out)
    _write_all(sys.stderr, err)
    return exit_status


def _run_locally(argv: list[str]) -> None:
    """No service answers: run the full command line instead (it will not ask again)."""
    here = __file__.rpartition("/")[0] or "."
    launcher = f"{here}/../../../../bin/libcare-ctl"
    posix.execve(launcher, [launcher, *argv], {**posix.environ, protocol.NO_SERVICE_ENV.encode(): b"1"})


def main(argv: list[str]) -> int:
    """``libcare-ctl argv`` through the service, else run locally (no return then)."""
    try:
        status = forward(argv)
    except BrokenPipeError:                  # the reader went away (``| head``)
        return 0
    if status is None:
        _run_locally(argv)
    return status


def leave(status: int) -> None:
    """Exit with ``status`` as soon as the output is flushed: the interpreter's own teardown
    (freeing every module and object) has nothing to do for us and took 2-3 ms."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):        # the reader went away: nothing more to say
            pass
    posix._exit(status)


if __name__ == "__main__":      # launchers installed before client_main.py ran this file
    leave(main(sys.argv[1:]))
