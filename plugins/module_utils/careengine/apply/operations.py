"""The public apply API: patch, unpatch and report many processes.

The Ansible modules and ``libcare-ctl`` call exactly these. One process failing (or
exiting meanwhile) never stops the others and never raises out of here: it becomes a
result whose ``error`` or object ``action == "failed"`` says why. What concerns the whole
request is raised before any process is touched: a source that is missing, that someone but
root could change (:mod:`..store_permissions`), that fails its integrity check, or an audit
log that cannot be written.

Every patch, unpatch and refusal outside check mode leaves one line per object in the
audit log (:mod:`..audit`), naming ``requested_by``.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import weakref

from ..audit import AuditLog, DigestLookup, Requester, refusal_records, result_records
from ..audit_index import applied_index
from ..errors import AuditError, CareError, NotApplicable, StoreError
from ..process import mapped_objects, read_maps
from ..results import ObjectResult, ProcessInfo, ProcessResult
from ..storage import PatchSource
from ..store_permissions import check_patch_source
from . import engine, fleet


def all_pids() -> list[int]:
    """Every process but ourselves and pid 1, ascending."""
    own = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (own, 1):
            found.append(int(entry))
    return sorted(found)


def _maps_object_with(pid: int, build_ids: set[str]) -> bool:
    """True if process ``pid`` maps an object with one of ``build_ids`` (or has a patch for one)."""
    try:
        mappings = read_maps(pid)
        objects = mapped_objects(pid, mappings)
    except CareError:
        return False
    return any(mapped.build_id in build_ids for mapped in objects)


def _failed_process(pid: int, message: str) -> ProcessResult:
    return ProcessResult(pid=pid, comm=engine.read_comm(pid), error=message)


def _safely(pid: int, action, *args, **kwargs):
    try:
        return action(pid, *args, **kwargs)
    except CareError as exc:
        return _failed_process(pid, str(exc))
    except Exception as exc:  # a bug must not stop the other processes
        return _failed_process(pid, f"internal error: {type(exc).__name__}: {exc}")


def open_source(source: str | PatchSource, *, verify: bool = True,
                allowed_signers: str | None = None) -> PatchSource:
    """The patch source at ``source``, its ``SHA256SUMS`` (and signature) checked (see
    :class:`PatchSource`); raises a CareError before any process is looked at."""
    if isinstance(source, PatchSource):
        return source
    return PatchSource(source, verify=verify, allowed_signers=allowed_signers)


# A source admit_source just let in -> (insecure_store, check) of that admission, until the
# patch_processes call that uses it: the command line admits first (its warnings, the
# integrity facts it prints), then patches; that call does not check the same source again.
_fresh_admissions: weakref.WeakKeyDictionary[PatchSource, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def _just_admitted(source: str | PatchSource, insecure_store: bool, check: bool) -> bool:
    """True, once, if ``source`` was admitted by the last :func:`admit_source` for it at
    least as strictly as now asked (owner and mode checked unless both skip it; the audit log
    prepared unless both are check mode)."""
    if not isinstance(source, PatchSource):
        return False
    admitted = _fresh_admissions.pop(source, None)
    if admitted is None:
        return False
    was_insecure, was_check = admitted
    return (insecure_store or not was_insecure) and (check or not was_check)


def admit_source(source: str | PatchSource, *, pids: list[int] | None = None, verify: bool = True,
                 allowed_signers: str | None = None, insecure_store: bool = False,
                 requested_by: Requester | None = None, audit_log: str | None = None,
                 check: bool = False) -> PatchSource:
    """:func:`open_source` for patching, after checking that the audit log can be written and
    that only root can change the source (unless ``insecure_store``).

    A refusal (insecure, missing, not matching SHA256SUMS, badly signed) is logged (outside
    check mode) for each of ``pids`` and raised, before any process is looked at.
    """
    trail = None if check else AuditLog(audit_log)
    if trail is not None:
        trail.prepare()
    source_path = source.path if isinstance(source, PatchSource) else source
    try:
        if not insecure_store:
            check_patch_source(source_path)
        admitted = open_source(source, verify=verify, allowed_signers=allowed_signers)
        _fresh_admissions[admitted] = (insecure_store, check)
        return admitted
    except CareError as exc:
        if trail is not None:
            trail.append_all(refusal_records("patch", str(exc), requested_by or Requester.from_command(sys.argv),
                                             pids=pids, source=source_path, insecure_store=insecure_store))
        raise


def patch_processes(source: str | PatchSource, pids: list[int] | None = None, *, level: int | None = None,
                    timeout: float = 5.0, retries: int = 0, check: bool = False, verify: bool = True,
                    allowed_signers: str | None = None, requested_by: Requester | None = None,
                    audit_log: str | None = None, insecure_store: bool = False,
                    force_unsafe: bool = False) -> list[ProcessResult]:
    """Apply the patches of ``source`` (store directory or patch file) to processes.

    ``pids`` None: every process (but ourselves and pid 1) mapping an object the source
    has a patch for. ``check``: read memory only and report what would happen
    (``paused_us`` None). ``retries``: extra whole attempts after a busy refusal.
    ``verify`` / ``allowed_signers``: see :func:`open_source` (ignored when ``source``
    is an opened :class:`PatchSource`). Each patch is also validated against itself and
    its target object before the process is stopped (:mod:`.validate`).
    ``requested_by``: who asked, for the audit log (default: this command line);
    ``audit_log``: its path (default :func:`..audit.default_audit_log_path`); check mode
    logs nothing. ``insecure_store``: skip the owner and mode check of the source
    (:func:`..store_permissions.check_patch_source`; tests and labs only).
    ``force_unsafe``: patch a process that can switch stacks although one of them could
    not be found (the result's reason says so; see :func:`.engine.patch_process`).
    """
    requester = requested_by or Requester.from_command(sys.argv)
    if _just_admitted(source, insecure_store, check):
        patch_source = source
    else:
        patch_source = admit_source(source, pids=pids, verify=verify, allowed_signers=allowed_signers,
                                    insecure_store=insecure_store, requested_by=requester, audit_log=audit_log,
                                    check=check)
    trail = None if check else AuditLog(audit_log)
    source = patch_source.path
    explicit = pids is not None
    if pids is None:
        build_ids = set(patch_source.build_ids())
        pids = [pid for pid in all_pids() if _maps_object_with(pid, build_ids)]

    def patch_one(pid: int) -> ProcessResult:
        result = _safely(pid, engine.patch_process, patch_source, level=level, timeout=timeout, retries=retries,
                         check=check, force_unsafe=force_unsafe)
        if explicit and not result.objects and not result.error and patch_source.store is None:
            result = ProcessResult(pid=pid, comm=result.comm, error=str(NotApplicable(
                f"no object in process {pid} has build-id {patch_source.build_ids()[0]}, "
                f"the one {source} was made for")))
        return result

    results = fleet.run_parallel(patch_one, pids)
    if trail is not None:
        _record(trail, result_records("patch", results, requester, source=source,
                                      patch_sha256=_patch_digests(patch_source, level),
                                      signer=patch_source.signer, insecure_store=insecure_store))
    return results


def _patch_digests(patch_source: PatchSource, requested_level: int | None) -> DigestLookup:
    """The sha256 of the patch file ``patch_source`` holds for a build-id at a level (cached per file)."""
    digests: dict[str, str] = {}

    def digest(build_id: str, level: int | None) -> str | None:
        path = _patch_path(patch_source, build_id, requested_level if level is None else level)
        if path is None:
            return None
        if path not in digests:
            try:
                with open(path, "rb") as stream:
                    digests[path] = hashlib.file_digest(stream, "sha256").hexdigest()
            except OSError:
                return None
        return digests[path]

    return digest


def _patch_path(patch_source: PatchSource, build_id: str, level: int | None) -> str | None:
    if patch_source.store is None:
        return patch_source.path
    try:
        found = patch_source.store.find(build_id, level)
        if found is None and level is not None:
            found = patch_source.store.find(build_id)       # a flat <build-id>.kpatch has its level inside
            found = found if found is not None and found.level == level else None
    except CareError:
        return None
    return found.path if found is not None else None


def _record(trail: AuditLog, records: list[dict]) -> None:
    """Append ``records``; the actions are done, so a failure is reported on stderr, not raised."""
    try:
        trail.append_all(records)
    except AuditError as exc:
        print(f"libcare: warning: {exc}; {len(records)} audit record(s) not written", file=sys.stderr)


def unpatch_processes(pids: list[int] | None = None, build_ids: list[str] | None = None, *,
                      timeout: float = 5.0, check: bool = False, requested_by: Requester | None = None,
                      audit_log: str | None = None) -> list[ProcessResult]:
    """Remove applied patches (all, or those for ``build_ids``) from processes.

    ``pids`` None: every process that has an applied patch. ``requested_by`` and
    ``audit_log`` as for :func:`patch_processes`; check mode logs nothing.
    """
    requester = requested_by or Requester.from_command(sys.argv)
    trail = None if check else AuditLog(audit_log)
    if trail is not None:
        trail.prepare()
    if pids is None:
        pids = [pid for pid in all_pids() if _has_applied_patch(pid)]
    results = fleet.run_parallel(
        lambda pid: _safely(pid, engine.unpatch_process, build_ids, timeout=timeout, check=check), pids)
    if trail is not None:
        _record(trail, result_records("unpatch", results, requester, known=applied_index(trail)))
    return results


def _has_applied_patch(pid: int) -> bool:
    try:
        return bool(engine.read_applied_patches(pid, read_maps(pid)))
    except CareError:
        return False


def info_processes(pids: list[int] | None = None, source: str | None = None) -> list[ProcessInfo]:
    """What each process maps and has applied, and what ``source`` offers (read-only)."""
    patch_source = None
    if source:
        if not os.path.exists(source):
            raise StoreError(f"patch source {source} does not exist")
        patch_source = PatchSource(source, verify=False)   # read only: compares levels, applies nothing
    explicit = pids is not None
    if pids is None:
        pids = all_pids()
    infos = []
    for pid in pids:
        try:
            infos.append(engine.info_process(pid, patch_source))
        except CareError as exc:
            if explicit:
                infos.append(ProcessInfo(pid, engine.read_comm(pid), (), str(exc)))
        except Exception as exc:
            infos.append(ProcessInfo(pid, engine.read_comm(pid), (), f"internal error: {type(exc).__name__}: {exc}"))
    return infos


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            return stream.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def select_pids(*, pid: int | None = None, pids: list[int] | None = None, exe: str | None = None,
                name: str | None = None) -> list[int] | None:
    """The processes matching every given filter; None when no filter is given.

    ``exe``: the real path of ``/proc/PID/exe`` equals it; ``name``: a regular
    expression searched in the process name (comm) or its command line.
    """
    if pid is None and not pids and not exe and not name:
        return None
    candidates = sorted({*(pids or []), *([pid] if pid is not None else [])}) if (pid is not None or pids) \
        else all_pids()
    selected = []
    wanted_exe = os.path.realpath(exe) if exe else None
    pattern = re.compile(name) if name else None
    for candidate in candidates:
        if wanted_exe is not None:
            try:
                if os.path.realpath(f"/proc/{candidate}/exe") != wanted_exe:
                    continue
            except OSError:
                continue
        if pattern is not None:
            if not (pattern.search(engine.read_comm(candidate)) or pattern.search(_cmdline(candidate))):
                continue
        selected.append(candidate)
    return selected


__all__ = ["ObjectResult", "admit_source", "info_processes", "open_source", "patch_processes", "select_pids", "unpatch_processes"]
