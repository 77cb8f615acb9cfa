"""``libcare-ctl``: patch, unpatch and info on running processes.

Text output follows LibCare's lines; ``--json`` prints
``{"processes": [...], "summary": {...}}``. The exit status is 0 when everything asked
was done or already so (``unpatch`` too, unlike LibCare), 1 otherwise.

Every patch and unpatch is recorded in the audit log (``--audit-log``) with this command
line as who asked; ``info`` shows from it when and by whom each applied patch was applied.
As root, ``patch`` refuses a source that others than root could change unless
``--insecure-store`` is given (see ``store_permissions``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from collections.abc import Callable

from ..audit import Requester
from ..audit_index import applied_history
from ..results import ObjectAction, ObjectInfo, ProcessInfo, ProcessResult, summarize_results
from ..storage import DEFAULT_STORE
from . import operations

COMMAND_ALIASES = {"patch-user": "patch", "unpatch-user": "unpatch", "info-user": "info"}
EXIT_OK = 0
EXIT_FAILED = 1
# Called with "patch" or "unpatch" and the results of a change made (never in check mode).
ChangeObserver = Callable[[str, list[ProcessResult]], None]


def _pid_argument(text: str) -> int | None:
    if text == "all":
        return None
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a process id or 'all', not {text!r}") from None
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"invalid process id {pid}")
    return pid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libcare-ctl", description="Live-patch running processes.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="say more")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    patch = commands.add_parser("patch", aliases=["patch-user"], help="apply patches to processes")
    patch.add_argument("-p", "--pid", type=_pid_argument, required=True, help="PID or 'all'")
    patch.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for busy functions (5)")
    patch.add_argument("--retries", type=int, default=0, help="extra attempts after a busy refusal (0)")
    patch.add_argument("--force-unsafe", action="store_true",
                       help="DANGEROUS: patch a process that switches stacks (coroutines) even when one of its "
                            "stacks could not be found and may return into a replaced function")
    patch.add_argument("--level", type=int, default=None, help="patch level to apply (default: latest)")
    patch.add_argument("--check", action="store_true", help="only report what would be done")
    patch.add_argument("--json", action="store_true", help="print one JSON object")
    trust = patch.add_mutually_exclusive_group()
    trust.add_argument("--allowed-signers", metavar="FILE", default=None,
                       help="require SHA256SUMS.sig, signed by a key this ssh allowed_signers file lists")
    trust.add_argument("--no-verify", action="store_true",
                       help="apply patches without checking them against SHA256SUMS (e.g. built by LibCare)")
    patch.add_argument("--insecure-store", action="store_true",
                       help="do not refuse a source that users other than root could change (tests, labs)")
    _add_audit_log(patch)
    patch.add_argument("source", metavar="FILE|DIR",
                       help="a patch file or a patch store directory (checked against its SHA256SUMS)")

    unpatch = commands.add_parser("unpatch", aliases=["unpatch-user"], help="remove applied patches")
    unpatch.add_argument("-p", "--pid", type=_pid_argument, required=True, help="PID or 'all'")
    unpatch.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for busy code (5)")
    unpatch.add_argument("--check", action="store_true", help="only report what would be done")
    unpatch.add_argument("--json", action="store_true", help="print one JSON object")
    _add_audit_log(unpatch)
    unpatch.add_argument("build_ids", nargs="*", metavar="BUILD-ID", help="only these objects (default: all)")

    info = commands.add_parser("info", aliases=["info-user"], help="show objects and applied patches")
    info.add_argument("-p", "--pid", type=_pid_argument, default=None, help="PID or 'all' (default)")
    info.add_argument("-s", "--store", default=None,
                      help=f"patch store or file to compare with (default {DEFAULT_STORE} if it exists; '' for none)")
    info.add_argument("-b", "--build-id", default=None, help="only processes mapping this build-id")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    _add_audit_log(info, "the audit log that tells when and by whom each patch was applied")
    return parser


def _add_audit_log(parser: argparse.ArgumentParser, what: str = "append one JSON line per change here") -> None:
    parser.add_argument("--audit-log", metavar="PATH", default=None,
                        help=f"{what} (default $LIBCARE_AUDIT_LOG, else /var/log/libcare/audit.jsonl as root)")


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """:func:`build_parser`, built once: the resident service parses every request with it."""
    return build_parser()


def main(argv: list[str], requester: Requester | None = None, observer: ChangeObserver | None = None) -> int:
    """Run ``libcare-ctl`` with ``argv``; the exit status. ``requester``: who asked, for the
    audit log (default: this command line; the resident service passes its client).
    ``observer``: told the results of every patch and unpatch made (the service follows the
    operator's changes with it)."""
    args = _parser().parse_args(argv)
    args.requester = requester or Requester.from_command(["libcare-ctl", *argv])
    args.observer = observer
    command = COMMAND_ALIASES.get(args.command, args.command)
    for signo in (signal.SIGTERM, signal.SIGHUP):
        # Turn termination into an exception: a stopped patient is rolled back and
        # resumed on the way out instead of being left half-patched.
        signal.signal(signo, _terminate)
    try:
        return {"patch": _patch, "unpatch": _unpatch, "info": _info}[command](args)
    except Terminated as exc:
        print(f"libcare-ctl: {exc}; nothing was left half-done", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader went away (``| head``): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


class Terminated(BaseException):
    """We were asked to terminate (SIGTERM, SIGHUP)."""


def _terminate(signo, frame) -> None:
    raise Terminated(f"terminated by signal {signo}")


def _observe(args, command: str, results: list[ProcessResult]) -> None:
    if args.observer is not None and not args.check:
        args.observer(command, results)


def _pids(args) -> list[int] | None:
    return None if args.pid is None else [args.pid]


def _print_json(results: list[ProcessResult], extra: dict | None = None) -> None:
    print(json.dumps({"processes": [r.to_json() for r in results], "summary": summarize_results(results),
                      **(extra or {})}, indent=2))


def _patch(args) -> int:
    if args.insecure_store:
        print(f"libcare-ctl: WARNING: --insecure-store: the owners and modes of '{args.source}' are NOT checked; "
              f"whoever can write there can run code as root in the patched processes", file=sys.stderr)
    source = operations.admit_source(args.source, pids=_pids(args), verify=not args.no_verify,
                              allowed_signers=args.allowed_signers, insecure_store=args.insecure_store,
                              requested_by=args.requester, audit_log=args.audit_log, check=args.check)
    if args.no_verify and not args.json:
        print(f"The patches in '{args.source}' were NOT verified against SHA256SUMS (--no-verify)")
    if args.force_unsafe:
        print("libcare-ctl: WARNING: --force-unsafe: a coroutine stack that could not be found may resume in a "
              "replaced function's old code", file=sys.stderr)
    results = operations.patch_processes(source, _pids(args), level=args.level, timeout=args.timeout,
                                  retries=args.retries, check=args.check, requested_by=args.requester,
                                  audit_log=args.audit_log, insecure_store=args.insecure_store,
                                  force_unsafe=args.force_unsafe)
    _observe(args, "patch", results)
    ok = all(result.ok for result in results)
    if args.json:
        _print_json(results, {"integrity": {"verified": source.verified, "signer": source.signer}})
        return EXIT_OK if ok else EXIT_FAILED
    if source.signer and args.verbose:
        print(f"'{args.source}' is signed by {source.signer}")
    for result in results:
        _report_patch(result, args)
    if args.pid is None and not results:
        print(f"No patch(es) in '{args.source}' match a running process")
    return EXIT_OK if ok else EXIT_FAILED


def _report_patch(result: ProcessResult, args) -> None:
    if result.error:
        print(f"Failed to apply patch '{args.source}' to PID '{result.pid}': {result.error}", file=sys.stderr)
        return
    applied = [o for o in result.objects if o.action == ObjectAction.APPLIED]
    failed = [o for o in result.objects if o.action == ObjectAction.FAILED]
    for obj in result.objects:
        line = f"{obj.path}: {obj.action.value}: {obj.reason}"
        if obj.action == ObjectAction.FAILED:
            print(f"PID '{result.pid}': {line}", file=sys.stderr)
        elif obj.action == ObjectAction.SKIPPED:
            print(f"PID '{result.pid}' ({result.comm}): {line}")
        elif args.verbose:
            extra = f" (paused {obj.paused_us} us)" if obj.paused_us is not None else ""
            print(line + extra)
    if failed:
        print(f"Failed to apply patch '{args.source}' to PID '{result.pid}'", file=sys.stderr)
    elif applied:
        verb = "would be" if args.check else "have been"
        print(f"{len(applied)} patch hunk(s) {verb} successfully applied to PID '{result.pid}'")
    elif not result.objects:
        print(f"No patch(es) applicable to PID '{result.pid}' have been found")


def _unpatch(args) -> int:
    results = operations.unpatch_processes(_pids(args), args.build_ids or None, timeout=args.timeout, check=args.check,
                                    requested_by=args.requester, audit_log=args.audit_log)
    _observe(args, "unpatch", results)
    ok = all(result.ok for result in results)
    if args.json:
        _print_json(results)
        return EXIT_OK if ok else EXIT_FAILED
    for result in results:
        if result.error:
            print(f"Failed to cancel patches for {result.pid}: {result.error}", file=sys.stderr)
            continue
        failed = [o for o in result.objects if o.action == ObjectAction.FAILED]
        removed = [o for o in result.objects if o.action == ObjectAction.REMOVED]
        if args.verbose:
            for obj in result.objects:
                print(f"{obj.path}: {obj.action.value}: {obj.reason}")
        if failed:
            print(f"Failed to cancel patches for {result.pid}: {failed[0].reason}", file=sys.stderr)
        elif removed:
            verb = "would be" if args.check else "were"
            print(f"{len(removed)} patch hunk(s) {verb} successfully cancelled from PID '{result.pid}'")
        else:
            print(f"No patch(es) cancellable from PID '{result.pid}' were found")
    return EXIT_OK if ok else EXIT_FAILED


def _info_source(args) -> str | None:
    if args.store is None:
        return DEFAULT_STORE if os.path.exists(DEFAULT_STORE) else None
    if args.store in ("", "/dev/null"):
        return None
    return args.store


def _info(args) -> int:
    source = _info_source(args)
    if source is None and args.store is None and not args.json:
        print(f"libcare-ctl: no patch store found (looked for {DEFAULT_STORE}; give one with -s STORE): "
              "showing applied patches only", file=sys.stderr)
    infos = _infos_with_build_id(operations.info_processes(_pids(args), source), args.build_id)
    failed = [i for i in infos if i.unpatchable and not i.objects]
    history = applied_history(infos, args.audit_log)
    if args.json:
        print(json.dumps({"processes": _info_json(infos, history)}, indent=2))
    else:
        shown = sum(_print_info(info, history, args) for info in infos)
        if not shown and not failed:
            print("No live patch is applied" + (" or available" if source else "") + " in the processes looked at")
    return EXIT_FAILED if failed and args.pid is not None else EXIT_OK


def _infos_with_build_id(infos: list[ProcessInfo], build_id: str | None) -> list[ProcessInfo]:
    """``infos`` narrowed to the processes and objects with ``build_id`` (all when None)."""
    if not build_id:
        return infos
    wanted = build_id.lower()
    return [ProcessInfo(i.pid, i.comm, tuple(o for o in i.objects if o.build_id == wanted), i.unpatchable)
            for i in infos if any(o.build_id == wanted for o in i.objects)]


def _info_json(infos: list[ProcessInfo], history: dict[tuple, dict]) -> list[dict]:
    """The processes for ``--json``, each applied patch with when and by whom it was applied."""
    processes = [i.to_json() for i in infos]
    for info, shown in zip(infos, processes, strict=True):
        for obj, entry in zip(info.objects, shown["objects"], strict=True):
            record = history.get((info.pid, obj.build_id, obj.applied_level))
            entry["applied_at"] = record["time"] if record else None
            entry["applied_by"] = record["requested_by"] if record else None
    return processes


def _print_info(info: ProcessInfo, history: dict[tuple, dict], args) -> int:
    """Print one process's report; return the number of lines printed for it."""
    if info.unpatchable and not info.objects:
        print(f"pid={info.pid}: {info.unpatchable}", file=sys.stderr)
        return 0
    if args.build_id:
        print(f"pid={info.pid} comm={info.comm}")
        for obj in info.objects:
            print(f"{os.path.basename(obj.path)} {obj.build_id}")
        return 1 + len(info.objects)
    shown = [o for o in info.objects
             if args.verbose or args.pid is not None or o.applied_level is not None
             or o.available_level is not None]
    if not shown:
        return 0
    print(f"pid={info.pid} comm={info.comm}")
    for obj in shown:
        print(_info_line(obj, history.get((info.pid, obj.build_id, obj.applied_level))))
    return 1 + len(shown)


def _info_line(obj: ObjectInfo, record: dict | None) -> str:
    """One object's line: build-id, applied and latest level, functions, when applied."""
    line = f"{os.path.basename(obj.path)} buildid={obj.build_id or '-'}"
    if obj.applied_level is not None:
        line += f" patchlvl={obj.applied_level}"
    if obj.available_level is not None:
        line += f" latest={obj.available_level}"
        if obj.applied_level is None or obj.applied_level < obj.available_level:
            line += " VULNERABLE"
    if obj.functions:
        line += " functions=" + ",".join(obj.functions)
    if obj.interrupted:
        line += f" interrupted={obj.interrupted}"
    if record:
        line += f" applied={record['time']} by={_who(record.get('requested_by') or {})}"
    return line


def _who(requested_by: dict) -> str:
    """``root/command``, ``root/ansible:alice@10.0.0.5``, ``alice/service``: one word."""
    who = f"{requested_by.get('user')}/{requested_by.get('via')}"
    if requested_by.get("via") == "ansible":
        who += f":{requested_by.get('ansible_user')}@{requested_by.get('ansible_host')}"
    return who
