"""Run one ``libcare-ctl`` command for a client of the socket, its output captured.

Root's requests run in the service itself (no start-up cost). Another user's run in a
forked child that takes that user's identity first, so it sees exactly what the user's
own ``/proc`` access shows: their own processes, nobody else's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from typing import TYPE_CHECKING

from ..errors import CareError
from .server import Peer

if TYPE_CHECKING:
    from ..apply.ctl import ChangeObserver

_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def run_ctl(argv: list[str], cwd: str, peer: Peer, observer: ChangeObserver | None = None) -> tuple[int, str, str]:
    """``libcare-ctl argv`` run here for ``peer``, from directory ``cwd``: (exit status, stdout,
    stderr). The audit trail names the peer as the requester; ``observer`` is told the results
    of the patch or unpatch made (see :func:`..apply.ctl.main`)."""
    from ..apply import ctl
    from ..audit import Requester

    stdout, stderr = io.StringIO(), io.StringIO()
    handlers = {signo: signal.getsignal(signo) for signo in _HANDLED_SIGNALS}
    try:
        os.chdir(cwd)
    except OSError:
        return 1, "", f"libcare-ctl: error: cannot use the working directory {cwd}\n"
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = ctl.main(argv, requester=Requester.from_service(peer.uid, peer.pid), observer=observer)
            except CareError as exc:
                print(f"libcare-ctl: error: {exc}", file=stderr)
                status = exc.exit_code
            except SystemExit as exc:           # argparse: usage errors and --help
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            except Exception as exc:            # a bug must not take the service down
                print(f"libcare-ctl: internal error in the service: {type(exc).__name__}: {exc}", file=stderr)
                status = 1
    finally:
        for signo, handler in handlers.items():
            signal.signal(signo, handler)
        os.chdir("/")
    return status, stdout.getvalue(), stderr.getvalue()


def run_ctl_as(peer: Peer, argv: list[str], cwd: str) -> tuple[int, str, str]:
    """``libcare-ctl argv`` run in a child with ``peer``'s uid and gid (no other groups)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:   # pragma: no cover - the child leaves through os._exit
        code = 70
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(peer.gid, peer.gid, peer.gid)
            os.setresuid(peer.uid, peer.uid, peer.uid)
            status, out, err = run_ctl(argv, cwd, peer)
            payload = json.dumps([status, out, err]).encode()
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as stream:
        chunks.append(stream.read())
    os.waitpid(child, 0)
    try:
        status, out, err = json.loads(b"".join(chunks))
    except ValueError:
        return 1, "", "libcare-ctl: the service could not run the request as your user\n"
    return status, out, err
