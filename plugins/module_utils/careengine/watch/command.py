"""``libcare-ctl watch``: run the service, or ask it for its status."""

from __future__ import annotations

import argparse

from ..errors import CareError
from ..storage import DEFAULT_STORE
from . import client
from .protocol import DEFAULT_SOCKET, SOCKET_ENV


class ServiceNotRunning(CareError):
    """``watch --status`` found no service on the socket."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libcare-ctl watch",
        description="Keep every process patched: new processes, restarts and re-execs get the store's "
                    "patches before their own code runs.")
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"the patch store to converge to ({DEFAULT_STORE})")
    parser.add_argument("--socket", default=None, help=f"control socket (${SOCKET_ENV}, "
                                                       f"else {DEFAULT_SOCKET})")
    parser.add_argument("--socket-group", default=None,
                        help="group allowed to connect (mode 0660; info and --status only); default: root only (0600)")
    parser.add_argument("--operator-group", default=None, help="group allowed to patch and unpatch besides root")
    parser.add_argument("--path", action="append", default=[], metavar="PATH",
                        help="also look for patched objects in this directory or file (repeatable)")
    parser.add_argument("--rescan", type=float, default=2.0,
                        help="seconds between looks for processes that were not caught (2)")
    parser.add_argument("--audit-log", metavar="PATH", default=None,
                        help="append one JSON line per patch the service makes here (default $LIBCARE_AUDIT_LOG, "
                             "else /var/log/libcare/audit.jsonl)")
    parser.add_argument("--no-realtime", action="store_true",
                        help="do not raise the tracer to SCHED_FIFO while a patient is stopped")
    parser.add_argument("--status", action="store_true", help="print the running service's status and exit")
    parser.add_argument("--json", action="store_true", help="with --status: one JSON object")
    return parser


def main(argv: list[str]) -> int:
    """``libcare-ctl watch ...``; the exit status."""
    args = build_parser().parse_args(argv)
    socket_path = args.socket or client.socket_path()
    if args.status:
        answer = client.request(["watch", "--status", *(["--json"] if args.json else [])], socket_path, timeout=30)
        if answer is None:
            raise ServiceNotRunning(f"no service answers on {socket_path}")
        return client.print_answer(answer)
    from ..process import realtime
    from .discovery import DEFAULT_SEARCH_PATHS
    from .service import Service

    realtime.enabled = not args.no_realtime

    service = Service(args.store, socket_path, search_paths=(*DEFAULT_SEARCH_PATHS, *args.path),
                      socket_group=args.socket_group, operator_group=args.operator_group,
                      rescan_interval=args.rescan, audit_log=args.audit_log)
    return service.run()
