"""Patch, unpatch and report one process: the steps of the algorithm, in order.

Patch (:func:`patch_process`):

1. :func:`read_patient`         maps, mapped objects (build-ids from memory), applied patches;
2. :func:`match_patches`        objects whose build-id the source has a patch for;
3. :func:`decide_level`         apply, replace a lower level (or a leftover of an
                                interrupted run), or skip/fail;
4. :func:`plan_object`          :func:`resolve_imports`, :func:`choose_patch_address`,
                                ``link_patch`` — all before the patient is stopped;
5. :func:`apply_plans`          :func:`warm_caches`; with one thread held:
                                :func:`map_patch`, :func:`save_original_bytes`,
                                :func:`write_patch`, :func:`resolve_ifuncs`, unwind tables;
                                then every thread stopped: :func:`wait_until_safe`,
                                :func:`write_jumps`, :func:`restore_functions` (a replaced
                                level), resume; then with one thread held a replaced level is
                                unmapped. Any error rolls everything back
                                (:class:`Journal`): never half-patched.

Unpatch (:func:`unpatch_process`) checks that no thread is anywhere in the patch
mapping (new functions and the jump table included) and restores the saved bytes with
every thread stopped, then unmaps with one thread held. Info (:func:`info_process`) only
reads memory: it never stops the patient.

Memory protection (W^X): the patch mapping is made read + write while it is filled, then
its code part (header, ELF image, jump table, undo bytes) becomes read + execute and its
data (``.kpatch.data``, on pages of its own, see :mod:`.layout`) stays read + write; no page
is both writable and executable. LibCare maps one RWX region, so its ``info``/``unpatch``
do not recognise a patch applied by this engine.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from .. import faults
from ..errors import BuildIdMismatch, CareError, NotApplicable, ProcessError, SymbolNotFound, UnsafeToPatch
from ..patchfile import (
    HEADER_SIZE,
    JUMP_SIZE,
    NEW_SYMBOL_SUFFIX,
    InfoEntry,
    PatchFile,
    PatchHeader,
    decode_header,
    decode_info_table,
)
from ..process import (
    CALL_RETURN_STUB,
    MappedObject,
    Mapping,
    StoppedProcess,
    find_applied_patches,
    free_holes,
    mapped_objects,
    read_maps,
    read_ranges,
    read_ranges_lenient,
)
from ..process.tracer import StoppedThread
from ..results import ObjectAction, ObjectInfo, ObjectResult, ProcessInfo, ProcessResult
from ..storage import PatchSource, StoredPatch
from .coroutines import stack_switching
from .image import DATA_SIZE_FIELD, IDENTITY_FIELD, LinkedPatch, PatchImage, link_patch, read_patch_image, split_import
from .layout import (
    JUMP_ENTRY_SLOT,
    PAGE_SIZE,
    PlacementError,
    choose_address,
    jump_instruction,
    reach_window,
)
from .object_files import ObjectFile, SymbolDef, object_file, preloaded_libraries, search_order
from .patch_frames import patch_code_name, read_patch_code
from .run_to_return import ReturnRunner
from .safety import (
    BusyThread,
    FrameRules,
    GuardedRange,
    ThreadState,
    find_busy_threads,
    find_exit_point,
    make_rule_finder,
    warm_unwind_caches,
)
from .split_parts import split_parts
from .stacks import find_busy_suspended
from .syscall_policy import check_seccomp, patch_mapping_calls, support_calls
from .unwind_registry import (
    FrameRegistry,
    MappedTables,
    data_pages_offset,
    find_registry,
    has_unwind_tables,
    plan_tables,
    register_tables,
    release_tables,
    return_stub_in_mapping,
    tables_in_mapping,
)
from .validate import validate

PROT_READ_WRITE = 0x3
PROT_READ_EXEC = 0x5
MAX_DATA_SIZE = 1 << 30
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000
HEAP_RESERVE = 64 << 20          # leave room above [heap] for brk to grow
PF_KTHREAD = 0x00200000
_FIRST_RETRY_DELAY = 0.005
_MAX_RETRY_DELAY = 0.1


# ---------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class AppliedPatch:
    """A patch found applied in a patient, reconstructed from its memory alone."""

    mapping: Mapping
    header: PatchHeader
    identity: int
    entries: tuple[InfoEntry, ...]
    undo: tuple[bytes, ...]          # the saved original bytes, per entry
    names: tuple[str, ...]           # per entry: the function's name
    jumps_in_place: int = -1         # replaced functions that jump to it now (-1: not checked)
    data_size: int = 0               # its writable pages, right after ``mapping`` (0: none)
    leftovers: tuple[AppliedPatch, ...] = ()   # other patch mappings of the same object (interrupted runs)
    tables: MappedTables | None = None   # its unwind tables, which may be registered (None: none)
    return_stub: int = 0             # the remote-call return stub in its code pages (0: none)

    @property
    def all_mappings(self) -> tuple[AppliedPatch, ...]:
        """This patch and its leftovers: every patch mapping of the object."""
        return (self, *self.leftovers)

    @property
    def clean(self) -> bool:
        """Complete, with no leftover of an interrupted run beside it."""
        return self.complete and not self.leftovers

    @property
    def in_force(self) -> bool:
        """Every function it replaces jumps to it and none jumps to a leftover: the
        process runs exactly this level (a leftover without jumps changes nothing)."""
        return self.complete and not any(leftover.jumps_in_place > 0 for leftover in self.leftovers)

    def interrupted(self) -> str:
        """'' when clean; else each mapping's level and jumps in place (``level2:1/2,level1:1/2``)."""
        if self.clean:
            return ""
        return ",".join(f"level{patch.level}:{max(patch.jumps_in_place, 0)}/{len(patch.replaced_functions)}"
                        for patch in self.all_mappings)

    @property
    def total_size(self) -> int:
        """Bytes to unmap: the read + execute mapping and the data pages after it."""
        return self.mapping.size + self.data_size

    @property
    def complete(self) -> bool:
        """Every replaced function jumps to the patch (not a leftover of an interrupted run)."""
        return self.jumps_in_place == len(self.replaced_functions)

    @property
    def build_id(self) -> str:
        return self.header.build_id

    @property
    def level(self) -> int:
        return self.header.level

    @property
    def replaced_functions(self) -> tuple[str, ...]:
        return tuple(name for name, entry in zip(self.names, self.entries, strict=True) if not entry.is_new)


# How patch and unpatch stop a process: StoppedProcess, unless a caller that already holds
# the process (the resident service, at a new process's exec) says otherwise.
_stop_process: Callable[..., StoppedProcess] = StoppedProcess


@contextlib.contextmanager
def stopping_with(factory: Callable[..., StoppedProcess]) -> Iterator[None]:
    """Within the block, patch and unpatch stop a process with ``factory(pid, timeout=...)``
    (a :class:`StoppedProcess` or a subclass) instead of :class:`StoppedProcess`."""
    global _stop_process
    previous = _stop_process
    _stop_process = factory
    try:
        yield
    finally:
        _stop_process = previous

@dataclass
class Patient:
    """What we know of a process before stopping it."""

    pid: int
    comm: str
    mappings: list[Mapping]
    objects: list[MappedObject]
    applied: dict[str, AppliedPatch]
    files: dict[int, ObjectFile] = field(default_factory=dict)   # MappedObject.start -> parsed file
    trampolines: frozenset[int] = frozenset()   # addresses of sigreturn trampolines (signal frames)
    waited_ns: int = 0                          # time the safety check waited for busy threads
    force_unsafe: bool = False                  # patch although a stack may be unaccounted for
    forced: list[str] = field(default_factory=list)   # the doubts force_unsafe went past
    rules: FrameRules | None = None             # unwind rules, made by warm_caches before the stop
    thread_ns: int = 0                          # time one thread was held for remote work (not a pause)

    def file_of(self, mapped: MappedObject) -> ObjectFile:
        parsed = self.files.get(mapped.start)
        if parsed is None:
            parsed = object_file(self.pid, mapped)
            self.files[mapped.start] = parsed
        return parsed

    def executable(self) -> MappedObject | None:
        try:
            exe = os.path.realpath(f"/proc/{self.pid}/exe")
        except OSError:
            exe = ""
        for mapped in self.objects:
            if mapped.path == exe:
                return mapped
        return self.objects[0] if self.objects else None


@dataclass
class ObjectPlan:
    """One object to patch in one process, prepared before stopping it."""

    mapped: MappedObject
    image: PatchImage
    linked: LinkedPatch
    ifuncs: dict[str, int]               # import name -> resolver address
    import_addresses: dict[str, int]
    replaces: AppliedPatch | None = None
    cold_ranges: tuple[GuardedRange, ...] = ()   # original ``foo.cold`` parts of replaced functions
    registry: FrameRegistry | None = None        # the patient's unwinder registry (patches with unwind tables)


def read_comm(pid: int) -> str:
    """The process name, or '' when it cannot be read."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as stream:
            return stream.read().strip()
    except OSError:
        return ""


def _strip_new_suffix(name: str) -> str:
    return name[: -len(NEW_SYMBOL_SUFFIX)] if name.endswith(NEW_SYMBOL_SUFFIX) else name


def decode_applied(mapping: Mapping, header_bytes: bytes, contents: bytes | None) -> AppliedPatch:
    """An applied patch from its mapping's bytes (header, info table, undo area, names)."""
    header = decode_header(header_bytes)
    identity = struct.unpack_from("<I", header_bytes, IDENTITY_FIELD)[0]
    entries: list[InfoEntry] = []
    undo: list[bytes] = []
    names: list[str] = []
    if contents is not None and 0 < header.user_info < len(contents):
        entries = decode_info_table(contents[header.user_info:])
        for index, entry in enumerate(entries):
            start = header.user_undo + JUMP_SIZE * index
            undo.append(contents[start:start + JUMP_SIZE])
            offset = entry.symstr - mapping.start
            name = ""
            if 0 <= offset < len(contents):
                name = contents[offset:contents.find(b"\0", offset)].decode("utf-8", "replace")
            names.append(_strip_new_suffix(name) or f"<function at {entry.daddr or entry.saddr:#x}>")
    data_size = struct.unpack_from("<I", header_bytes, DATA_SIZE_FIELD)[0]
    if data_size % PAGE_SIZE or data_size > MAX_DATA_SIZE:
        data_size = 0       # not ours (LibCare leaves the field 0): the mapping is all there is
    tables, return_stub = None, 0
    if contents is not None and entries:
        data_start = mapping.start + data_pages_offset(header.user_undo, len(entries))
        tables = tables_in_mapping(mapping.start, contents, header.kpatch_offset, data_start, entries[0].saddr)
        return_stub = return_stub_in_mapping(mapping.start, contents, header.user_undo, len(entries))
    return AppliedPatch(mapping, header, identity, tuple(entries), tuple(undo), tuple(names), data_size=data_size,
                        tables=tables, return_stub=return_stub)


def read_applied_patches(pid: int, mappings: list[Mapping]) -> dict[str, AppliedPatch]:
    """Applied patches by target build-id (bulk reads: their mappings, then the entry
    of every function they replace, to tell an applied patch from a leftover)."""
    found = find_applied_patches(pid, mappings)
    contents = read_ranges_lenient(pid, [(mapping.start, mapping.size) for mapping, _ in found]) if found else []
    decoded = []
    for (mapping, header_bytes), data in zip(found, contents, strict=True):
        try:
            decoded.append(decode_applied(mapping, header_bytes, data))
        except CareError:
            continue
    sites = [(patch, entry) for patch in decoded for entry in patch.entries if not entry.is_new]
    current = read_ranges_lenient(pid, [(entry.daddr, JUMP_SIZE) for _, entry in sites]) if sites else []
    jumps: dict[int, int] = {}              # patch mapping start -> jumps to it in place
    for (patch, entry), data in zip(sites, current, strict=True):
        if data is not None and data == _jump_or_none(entry):
            jumps[patch.mapping.start] = jumps.get(patch.mapping.start, 0) + 1
    return by_object([replace(patch, jumps_in_place=jumps.get(patch.mapping.start, 0)) for patch in decoded])


def by_object(patches: list[AppliedPatch]) -> dict[str, AppliedPatch]:
    """One entry per build-id: the patch in force (the highest level some function jumps
    to, else the highest level), the object's other mappings as its ``leftovers`` (a run
    killed mid-way leaves a mapping with no or some jumps; a level replacement killed
    mid-way leaves two levels sharing the functions)."""
    grouped: dict[str, list[AppliedPatch]] = {}
    for patch in patches:
        grouped.setdefault(patch.build_id, []).append(patch)
    in_force = {}
    for build_id, group in grouped.items():
        group.sort(key=lambda patch: (patch.jumps_in_place > 0, patch.level, patch.jumps_in_place), reverse=True)
        in_force[build_id] = replace(group[0], leftovers=tuple(group[1:]))
    return in_force


def _jump_or_none(entry: InfoEntry) -> bytes | None:
    try:
        return jump_instruction(entry.daddr, entry.saddr)
    except CareError:
        return None


def is_kernel_thread(pid: int) -> bool:
    """Whether ``pid`` is a kernel thread (PF_KTHREAD in /proc/PID/stat's flags)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            stat = stream.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2:].split()
    return len(fields) > 6 and bool(int(fields[6]) & PF_KTHREAD)


def has_exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (killed while we held it, say)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            stat = stream.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X")


def refuse_special(pid: int, action: str) -> None:
    """Refuse init and kernel threads, saying which, before anything else is read."""
    if pid == 1:
        raise NotApplicable(f"refusing to {action} pid 1 (init): a fault there would take the whole system down")
    if is_kernel_thread(pid):
        raise NotApplicable(f"process {pid} is a kernel thread: it has no user space to {action}")


def read_patient(pid: int) -> Patient:
    """Step 1: maps, mapped objects and applied patches (no stopping)."""
    if is_kernel_thread(pid):
        raise NotApplicable(f"process {pid} is a kernel thread: it has no user space to patch")
    comm = read_comm(pid)
    mappings = read_maps(pid)
    objects = mapped_objects(pid, mappings)
    return Patient(pid, comm, mappings, objects, read_applied_patches(pid, mappings))


# ---------------------------------------------------------------------------- matching
def match_patches(patient: Patient, source: PatchSource, level: int | None) -> list[tuple[MappedObject, PatchFile]]:
    """Step 2: the mapped objects the source has a patch for, with that patch."""
    matches = []
    seen: set[str] = set()
    for mapped in patient.objects:
        if not mapped.build_id or mapped.build_id in seen:
            continue
        if source.store is not None:
            found = source.store.find(mapped.build_id, level)
        else:
            found = source.find(mapped.build_id)
        if found is None:
            continue
        seen.add(mapped.build_id)
        patch = _load_patch(source, found)
        if level is not None and source.store is None:
            patch = patch.with_level(level)
        if patch.build_id != mapped.build_id:
            raise BuildIdMismatch(f"patch {found.path} is for build-id {patch.build_id}, not {mapped.build_id}")
        matches.append((mapped, patch))
    return matches


# (path, size, mtime, level) -> patch: one read per file however many processes match it.
_loaded: dict[tuple[str, int, int, int], PatchFile] = {}


def _load_patch(source: PatchSource, found: StoredPatch) -> PatchFile:
    if source.verified:
        return source.load(found)   # checked against this source's SHA256SUMS, cached by the source itself
    try:
        status = os.stat(found.path)
    except OSError:
        return source.load(found)
    key = (found.path, status.st_size, status.st_mtime_ns, found.level)
    patch = _loaded.get(key)
    if patch is None:
        if len(_loaded) > 64:
            _loaded.clear()
        patch = _loaded[key] = source.load(found)
    return patch


@dataclass(frozen=True)
class Decision:
    """What to do with one object: "apply", "replace", or the result it gets without a plan
    (:attr:`ObjectAction.SKIPPED`, :attr:`ObjectAction.FAILED`)."""

    action: str
    reason: str = ""


def decide_level(image: PatchImage, applied: AppliedPatch | None) -> Decision:
    """Step 3: the patch-level rules."""
    if applied is None:
        return Decision("apply")
    if not applied.complete:
        return Decision("replace", f"replacing an incomplete level-{applied.level} patch (left by an interrupted run)")
    if applied.leftovers and image.level >= applied.level:
        return Decision("replace", f"replacing level {applied.level} and the leftovers of an interrupted run "
                                   f"({applied.interrupted()})")
    requested = image.level
    if applied.level == requested:
        if not applied.identity:
            # Applied by another tool (LibCare): nothing in memory identifies the patch.
            return Decision(ObjectAction.SKIPPED, f"level {requested} is already applied (by another tool; "
                                       "its contents cannot be compared)")
        if applied.identity == image.identity:
            return Decision(ObjectAction.SKIPPED, f"level {requested} is already applied")
        return Decision(ObjectAction.FAILED, f"a different patch is already applied at level {requested}; "
                                  "give the new patch a higher level")
    if requested > applied.level:
        return Decision("replace", f"replacing level {applied.level} with level {requested}")
    return Decision(ObjectAction.SKIPPED, f"level {applied.level} is applied, newer than the requested level {requested}")


# ---------------------------------------------------------------------------- planning
def resolve_imports(patient: Patient, image: PatchImage, target: MappedObject) -> tuple[dict[str, int], dict[str, int]]:
    """Addresses of the symbols the patch imports, as the dynamic linker would bind them.

    Search order: the executable, preloaded libraries, its DT_NEEDED libraries breadth
    first, other objects;
    a versioned name (``puts@GLIBC_2.2.5``) binds to that version only. The first
    definition wins, weak or strong (glibc's rule, so the patch binds as the process
    does); an undefined weak reference that nothing defines is 0; the target's own
    ``.symtab`` (locals too) is the last resort. Returns (addresses, IFUNC resolvers).
    """
    if not image.imports:
        return {}, {}
    for mapped in patient.objects:
        patient.file_of(mapped)
    order = search_order(patient.objects, patient.executable(), patient.files, preloaded_libraries(patient.pid))
    weak_imports = {s.name for s in image.symbols if s.is_import and s.bind == 2}
    addresses: dict[str, int] = {}
    ifuncs: dict[str, int] = {}
    for name in image.imports:
        found = _find_definition(patient, order, target, name)
        if found is None:
            if name in weak_imports:
                addresses[name] = 0
                continue
            raise _unresolved(patient, order, target, name)
        mapped, symbol = found
        address = mapped.load_bias + symbol.vaddr
        addresses[name] = address
        if symbol.is_ifunc:
            ifuncs[name] = address
    return addresses, ifuncs


def _find_definition(patient: Patient, order: list[MappedObject], target: MappedObject,
                     name: str) -> tuple[MappedObject, SymbolDef] | None:
    """The first definition of import ``name`` in search ``order``, else in the target's
    own ``.symtab``; None if nothing defines it."""
    base, version = split_import(name)
    for mapped in order:
        symbol = patient.file_of(mapped).lookup_dynamic(base, version)
        if symbol is not None:
            return mapped, symbol
    symbol = patient.file_of(target).lookup_local(base)
    return (target, symbol) if symbol is not None else None


def _unresolved(patient: Patient, order: list[MappedObject], target: MappedObject, name: str) -> SymbolNotFound:
    """The error for an import nothing defines: a process still starting, or a wrong patch."""
    missing = _libraries_not_loaded(patient, order)
    if missing:
        return SymbolNotFound(f"process {patient.pid} is still starting ({', '.join(missing)} not loaded "
                              f"yet), so symbol {name} cannot be resolved; try again")
    return SymbolNotFound(f"symbol {name} needed by the patch for {target.path} is defined in none of "
                          f"the objects loaded in process {patient.pid}")


def _libraries_not_loaded(patient: Patient, order: list[MappedObject]) -> list[str]:
    """DT_NEEDED names of loaded objects that are not loaded themselves (a process the
    dynamic linker is still setting up)."""
    loaded = set()
    for mapped in order:
        loaded.add(os.path.basename(mapped.path))
        soname = patient.files[mapped.start].soname if mapped.start in patient.files else None
        if soname:
            loaded.add(soname)
    return sorted({name for mapped in order if mapped.start in patient.files
                   for name in patient.files[mapped.start].needed if name not in loaded})


def choose_patch_address(mappings: list[Mapping], target: MappedObject, size: int,
                         taken: list[tuple[int, int]]) -> int:
    """Step 4b: a free range within ±2 GiB of the object (see layout.choose_address)."""
    occupied = list(mappings) + [Mapping(start, end, "---p", 0, "00:00", 0, "") for start, end in taken]
    holes = free_holes(occupied)
    avoid = [(m.end, m.end + HEAP_RESERVE) for m in mappings if m.path == "[heap]"]
    return choose_address(holes, target.start, target.end, size, avoid)


def plan_object(patient: Patient, mapped: MappedObject, image: PatchImage, taken: list[tuple[int, int]],
                replaces: AppliedPatch | None) -> ObjectPlan:
    """Step 4: everything for one object that needs no stopped patient."""
    import_addresses, ifuncs = resolve_imports(patient, image, mapped)
    size = image.layout().mapping_size
    address = choose_patch_address(patient.mappings, mapped, size, taken)
    taken.append((address, address + size))
    linked = link_patch(image, address, mapped.load_bias, import_addresses)
    _check_entries(linked, mapped)
    registry = frame_registry(patient) if has_unwind_tables(image) else None
    plan_tables(image, address, mapped.load_bias, 0, registry, patient.pid)     # refuses before any stop
    return ObjectPlan(mapped, image, linked, ifuncs, import_addresses, replaces,
                      cold_ranges(patient, mapped, image, linked), registry)


def frame_registry(patient: Patient) -> FrameRegistry | None:
    """libgcc's frame registration functions in the patient, bound as the dynamic linker
    binds them (see :mod:`.unwind_registry`); None when no object defines them."""
    for mapped in patient.objects:
        try:
            patient.file_of(mapped)
        except CareError:
            continue
    order = search_order(patient.objects, patient.executable(), patient.files, preloaded_libraries(patient.pid))

    def lookup(mapped: MappedObject, name: str) -> int | None:
        parsed = patient.files.get(mapped.start)
        symbol = parsed.lookup_dynamic(name, None) if parsed is not None else None
        return mapped.load_bias + symbol.vaddr if symbol is not None and symbol.vaddr else None

    def lookup_local(mapped: MappedObject, name: str) -> int | None:
        # libgcc linked statically (-static-libgcc): its copy in the executable's .symtab
        parsed = patient.files.get(mapped.start)
        symbol = parsed.lookup_local(name) if parsed is not None else None
        return mapped.load_bias + symbol.vaddr if symbol is not None and symbol.vaddr else None

    executable = patient.executable()
    return find_registry(order, lookup) or (find_registry([executable], lookup_local) if executable else None)


def cold_ranges(patient: Patient, mapped: MappedObject, image: PatchImage,
                linked: LinkedPatch) -> tuple[GuardedRange, ...]:
    """Step 4c: the ``foo.cold`` parts gcc split off each replaced function, from the
    object's ``.symtab``. The patch's record for ``foo`` covers only ``foo`` itself, but a
    thread in the old ``foo.cold`` (or returning into it) goes back into ``foo``'s body,
    so it counts as inside ``foo``. A stripped object has no names to find them by: there
    they are found from the code and the CFI (:mod:`.split_parts`)."""
    try:
        parsed = patient.file_of(mapped)
    except CareError:
        return ()
    if parsed.has_symtab:
        return tuple(GuardedRange(mapped.load_bias + part.vaddr, part.size, f"{name} ({part.name})")
                     for name in image.replaced_functions for part in parsed.cold_parts(name))
    ranges = []
    for entry, name, new in zip(linked.entries, image.entry_names, image.entry_is_new, strict=False):
        if new or entry.is_new or not entry.dlen:
            continue
        for begin, end in split_parts(entry.daddr - mapped.load_bias, entry.dlen, parsed.code_at,
                                      parsed.fde_range, parsed.is_function_entry):
            ranges.append(GuardedRange(mapped.load_bias + begin, end - begin,
                                       f"{name} (its split-off part at {mapped.load_bias + begin:#x})"))
    return tuple(ranges)


def _check_entries(linked: LinkedPatch, mapped: MappedObject) -> None:
    for entry in linked.entries:
        if entry.is_new:
            continue
        if not any(m.contains(entry.daddr) and m.contains(entry.daddr + JUMP_SIZE - 1) and m.executable
                   for m in mapped.mappings):
            raise BuildIdMismatch(f"the patch for {mapped.path} replaces code at {entry.daddr:#x}, which is not "
                                  "in its executable mappings: wrong patch for this object")


# ---------------------------------------------------------------------------- the stop
class Journal:
    """Every change made to the patient, so any failure can undo all of them: the writes
    (jumps, restored bytes), undone while every thread is stopped, and the mappings
    created and unwind tables registered, removed through one borrowed thread.
    ``patient`` is the stop the next undo goes through (the engine sets it per stop)."""

    def __init__(self, patient: StoppedProcess) -> None:
        self.patient = patient
        self.writes: list[tuple[int, bytes]] = []     # (address, bytes before)
        self.mappings: list[tuple[int, int]] = []     # (address, size) mapped by us
        self.tables: list[tuple[FrameRegistry, MappedTables, int]] = []   # registered (and their call stub)

    def write(self, address: int, data: bytes, before: bytes) -> None:
        self.writes.append((address, before))
        self.patient.write(address, data)

    def rollback(self) -> None:
        """Undo everything through ``patient``."""
        self.undo_writes()
        self.remove_created()

    def undo_writes(self) -> None:
        """Put back the bytes of every write, last first. One that cannot be put back may
        still jump into a created mapping: the mappings are then kept (never dangling)."""
        for address, before in reversed(self.writes):
            try:
                self.patient.write(address, before)
            except CareError:
                self.mappings.clear()
                self.tables.clear()
        self.writes.clear()

    def remove_created(self) -> None:
        """Deregister the registered unwind tables and unmap the created mappings."""
        for registry, tables, return_stub in reversed(self.tables):
            try:
                release_tables(self.patient, registry, tables, return_stub)
            except CareError:
                # The unwinder may still point into the mapping: leave it mapped (a
                # leftover the next run deregisters and removes), never dangling.
                self.mappings.clear()
        self.tables.clear()
        for address, size in reversed(self.mappings):
            try:
                self.patient.munmap(address, size)
            except CareError:
                pass
        self.mappings.clear()


def map_patch(stopped: StoppedProcess, plan: ObjectPlan, journal: Journal) -> None:
    """Step 5a: mmap the planned range in the patient (relink if it lands elsewhere)."""
    size = plan.linked.layout.mapping_size
    wanted = plan.linked.address
    try:
        address = stopped.mmap(wanted, size, PROT_READ_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
    except ProcessError:
        # The range was taken since we read the maps: plan again from the current ones.
        mappings = read_maps(stopped.pid)
        wanted = choose_patch_address(mappings, plan.mapped, size, [])
        address = stopped.mmap(wanted, size, PROT_READ_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
    journal.mappings.append((address, size))
    if address != plan.linked.address:
        low, high = reach_window(plan.mapped.start, plan.mapped.end, size)
        if not low <= address <= high - size:
            raise PlacementError(f"the kernel placed the patch for {plan.mapped.path} at {address:#x}, out of reach")
        plan.linked = link_patch(plan.image, address, plan.mapped.load_bias, plan.import_addresses)


def save_original_bytes(stopped: StoppedProcess, plans: list[ObjectPlan]) -> list[list[bytes]]:
    """Step 5b: the original 5 bytes of every replaced function (one read for all plans);
    a function a replaced level jumps from has its original bytes in that level's undo area."""
    per_plan: list[list[bytes]] = []
    wanted: list[tuple[int, int, int]] = []        # (plan, entry, address)
    for plan_index, plan in enumerate(plans):
        saved_before: dict[int, bytes] = {}
        if plan.replaces is not None:
            for entry, undo in zip(plan.replaces.entries, plan.replaces.undo, strict=False):
                if not entry.is_new:
                    saved_before[entry.daddr] = undo
        originals = [b"\0" * JUMP_SIZE] * len(plan.linked.entries)
        for entry_index, entry in enumerate(plan.linked.entries):
            if entry.is_new:
                continue
            if entry.daddr in saved_before:
                originals[entry_index] = saved_before[entry.daddr]
            else:
                wanted.append((plan_index, entry_index, entry.daddr))
        per_plan.append(originals)
    current = read_ranges(stopped.pid, [(address, JUMP_SIZE) for _, _, address in wanted]) if wanted else []
    for (plan_index, entry_index, _), data in zip(wanted, current, strict=True):
        per_plan[plan_index][entry_index] = data
    return per_plan


def write_patch(stopped: StoppedProcess, plan: ObjectPlan, originals: list[bytes]) -> None:
    """Step 5c: the whole mapping (image, jump table, undo area, remote-call return stub)
    in one write. The stub takes the trap slot (16-byte aligned, so at least 16 bytes
    before the end of the code pages): IFUNC resolvers return through it into
    ``rt_sigreturn`` (see process.sigframe), never into an ``int3``."""
    layout = plan.linked.layout
    undo_area = b"".join(originals)
    mapping = bytearray(plan.linked.mapping)
    mapping[layout.user_undo:layout.user_undo + len(undo_area)] = undo_area
    mapping[layout.trap_offset:layout.trap_offset + len(CALL_RETURN_STUB)] = CALL_RETURN_STUB
    assert layout.trap_offset + len(CALL_RETURN_STUB) <= layout.code_size
    stopped.write(plan.linked.address, bytes(mapping))


def seal_code(stopped: StoppedProcess, plan: ObjectPlan) -> None:
    """Step 5c': the mapping was made read + write; its code part becomes read + execute,
    its data pages (if any) stay read + write (W^X). Later writes by the engine (IFUNC
    targets, unpatch) go through /proc/PID/mem, which page protections do not stop."""
    stopped.mprotect(plan.linked.address, plan.linked.layout.code_size, PROT_READ_EXEC)


def resolve_ifuncs(stopped: StoppedProcess, plan: ObjectPlan) -> None:
    """Step 5d: call IFUNC resolvers in the patient; point their jump entries at the result."""
    layout = plan.linked.layout
    return_stub = plan.linked.address + layout.trap_offset
    for index, name in enumerate(plan.image.imports):
        resolver = plan.ifuncs.get(name)
        if resolver is None:
            continue
        target = stopped.remote_call(resolver, (), return_stub)
        slot = plan.linked.address + layout.jump_entry_offset(index) + JUMP_ENTRY_SLOT
        stopped.write(slot, struct.pack("<Q", target))


def register_patch_frames(stopped: StoppedProcess, plan: ObjectPlan, journal: Journal) -> None:
    """Step 5e: the patch code's unwind tables registered in the patient's unwinder
    (:mod:`.unwind_registry`), after the mapping is sealed and before any jump; the
    journal deregisters them if the run is rolled back."""
    code = next((entry.saddr for entry in plan.linked.entries), 0)
    tables = plan_tables(plan.image, plan.linked.address, plan.mapped.load_bias, code, plan.registry, stopped.pid)
    if tables is None or plan.registry is None:
        return
    return_stub = plan.linked.address + plan.linked.layout.trap_offset
    journal.tables.append((plan.registry, tables, return_stub))
    register_tables(stopped, plan.registry, tables, return_stub)


def release_frames(stopped: StoppedProcess, applied: AppliedPatch, registry: FrameRegistry | None) -> None:
    """Deregister the unwind tables of a patch mapping about to be unmapped, if they are
    registered. Raises ProcessError when that cannot be made sure: the caller then keeps
    the mapping (a registration must never outlive its memory)."""
    if applied.tables is not None:
        release_tables(stopped, registry, applied.tables, applied.return_stub)


def guarded_ranges_for_apply(plan: ObjectPlan) -> list[GuardedRange]:
    """Code no thread may be in while ``plan`` is applied."""
    ranges = [GuardedRange(entry.daddr, entry.dlen, name)
              for entry, name, new in zip(plan.linked.entries, plan.image.entry_names, plan.image.entry_is_new,
                                          strict=False)
              if not new and not entry.is_new]
    ranges.extend(plan.cold_ranges)
    if plan.replaces is not None:
        ranges.extend(guarded_patch_range(applied) for applied in plan.replaces.all_mappings)
    return ranges


def guarded_patch_range(applied: AppliedPatch) -> GuardedRange:
    """The whole mapping of an applied patch: new code, new functions, jump table."""
    return GuardedRange(applied.mapping.start, applied.mapping.size, patch_code_name(applied))


def patient_rules(patient: Patient) -> FrameRules:
    """The unwind rules of the patient's objects and of its applied patches' code
    (their records read back from its memory: :mod:`.patch_frames`)."""
    patches = [mapping for applied in patient.applied.values() for mapping in applied.all_mappings]
    return make_rule_finder(patient.objects, patient.files, read_patch_code(patient.pid, patches))


def _merge(ranges: list[GuardedRange]) -> list[GuardedRange]:
    """Drop overlapping ranges (keep the first) so the index stays bisectable."""
    merged: list[GuardedRange] = []
    for guarded in sorted(ranges, key=lambda r: r.start):
        if merged and guarded.start < merged[-1].start + merged[-1].size:
            continue
        merged.append(guarded)
    return merged


def warm_caches(patient: Patient, ranges: list[GuardedRange]) -> None:
    """Before stopping: parse every mapped object's file and its CFI search table, and
    pre-walk the stacks of blocked threads, so the check while stopped parses nothing."""
    trampolines = set()
    for mapped in patient.objects:
        try:
            parsed = patient.file_of(mapped)
            parsed.warm_cfi()
            trampolines.update(mapped.load_bias + vaddr for vaddr in parsed.sigreturn_trampolines())
        except Exception:  # noqa: BLE001 - best effort: the check while stopped copes without it
            pass
    patient.trampolines = frozenset(trampolines)
    stack_switching(patient.objects, patient.files)   # decided before the stop (cached per build-id)
    rule_at = patient.rules = patient_rules(patient)    # the applied patches' records read unpaused
    warm_unwind_caches(patient.pid, patient.mappings, _merge([r for r in ranges if r.size > 0]), rule_at)


def wait_until_safe(stopped: StoppedProcess, patient: Patient, ranges: list[GuardedRange], timeout: float,
                    action: str) -> None:
    """Step 5e: no thread inside ``ranges``. A busy thread whose outermost guarded frame
    is known from the CFI is run alone until it returns out of it (:mod:`.run_to_return`,
    the others stay stopped); otherwise the patient runs a little and is looked at again;
    all within ``timeout``, then UnsafeToPatch naming the thread and the function. In a
    process that can switch stacks, suspended stacks count too (:mod:`.stacks`). The time
    spent waiting is added to ``patient.waited_ns``."""
    ranges = _merge([r for r in ranges if r.size > 0])
    if not ranges:
        return
    rule_at = patient.rules if patient.rules is not None else patient_rules(patient)
    started = time.monotonic()
    deadline = started + timeout
    delay = _FIRST_RETRY_DELAY
    mappings = patient.mappings
    fresh = False
    runner = ReturnRunner(stopped)
    switching = stack_switching(patient.objects, patient.files)
    try:
        while True:
            threads = [ThreadState(tid, _registers(stopped, tid)) for tid in stopped.tids]
            if not fresh and not _stacks_known(threads, mappings):
                mappings = read_maps(patient.pid)
                fresh = True
            busy = find_busy_threads(patient.pid, threads, mappings, ranges, rule_at, patient.trampolines)
            doubt = None if busy else find_busy_suspended(
                patient.pid, threads, mappings, ranges, rule_at, switching, patient.trampolines)
            if doubt is not None and not doubt.proven and patient.force_unsafe:
                patient.forced.append(doubt.reason)
                return
            reason = busy[0].describe() if busy else doubt.reason if doubt is not None else None
            if reason is None:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnsafeToPatch(f"cannot {action} process {patient.pid}: {reason} "
                                    f"for {timeout:g}s; try again later or raise the timeout")
            if busy and _run_one_out(stopped, patient, runner, busy, threads, mappings, ranges, rule_at, remaining):
                continue
            stopped.run_for(min(delay, remaining))
            delay = min(delay * 2, _MAX_RETRY_DELAY)
            fresh = False
    finally:
        patient.waited_ns += int((time.monotonic() - started) * 1e9)
        runner.close()


def _run_one_out(stopped: StoppedProcess, patient: Patient, runner: ReturnRunner, busy: list[BusyThread],
                 threads: list[ThreadState], mappings: list[Mapping], ranges: list[GuardedRange], rule_at,
                 remaining: float) -> bool:
    """Run the first busy thread with a known exit point out of the guarded code (half the
    remaining time at most, so a thread waiting for a stopped one still leaves time to poll);
    True if one got out."""
    states = {thread.tid: thread for thread in threads}
    for found in busy:
        point = find_exit_point(patient.pid, states[found.tid], mappings, ranges, rule_at, patient.trampolines)
        if point is None:
            continue
        stopped.vet_thread(found.tid)      # it will make the trampoline's system call
        outcome = runner.run_out(point, time.monotonic() + max(remaining / 2, 0.001))
        return outcome in ("arrived", "gone")
    return False


def _registers(stopped: StoppedProcess, tid: int) -> dict[str, int]:
    regs = stopped.get_regs(tid)
    return {name: getattr(regs, name) for name in ("rip", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15")}


def _stacks_known(threads: list[ThreadState], mappings: list[Mapping]) -> bool:
    return all(any(m.contains(t.registers["rsp"]) for m in mappings) for t in threads)


def restore_functions(stopped: StoppedProcess, patches: tuple[AppliedPatch, ...], journal: Journal,
                      keep: frozenset[int] = frozenset()) -> None:
    """Put back the original bytes of every function that jumps to one of ``patches`` (the
    mappings of one object), one write each, except at ``keep`` (functions a new level's
    jumps took over). A function with its original bytes already is left alone; one
    whose bytes are neither is refused."""
    sites: dict[int, list[tuple[InfoEntry, bytes]]] = {}
    for applied in patches:
        for entry, undo in zip(applied.entries, applied.undo, strict=True):
            if not entry.is_new and entry.daddr not in keep:
                sites.setdefault(entry.daddr, []).append((entry, undo))
    addresses = sorted(sites)
    current = read_ranges(stopped.pid, [(address, JUMP_SIZE) for address in addresses]) if addresses else []
    for address, now in zip(addresses, current, strict=True):
        owner = next((undo for entry, undo in sites[address] if now == _jump_or_none(entry)), None)
        if owner is None:
            if any(now == undo for _, undo in sites[address]):
                continue
            raise ProcessError(f"the code at {address:#x} is not a jump a patch wrote; "
                               "something else changed it: refusing to restore it")
        with faults.step("restore-bytes", stopped.pid):
            journal.write(address, owner, now)


def write_jumps(stopped: StoppedProcess, plan: ObjectPlan, journal: Journal) -> None:
    """Step 5g: ``jmp rel32`` at every replaced function, to its new code, one write each;
    over a replaced level's jump where there is one, so each function goes from the old
    level to the new one directly."""
    entries = [entry for entry in plan.linked.entries if not entry.is_new]
    current = read_ranges(stopped.pid, [(entry.daddr, JUMP_SIZE) for entry in entries]) if entries else []
    for entry, now in zip(entries, current, strict=True):
        with faults.step("jump", stopped.pid):
            journal.write(entry.daddr, jump_instruction(entry.daddr, entry.saddr), now)


def apply_plans(pid: int, patient: Patient, plans: list[ObjectPlan], timeout: float) -> int:
    """Step 5: apply every plan, all or nothing; the pause (every thread stopped) in ns.

    Three stops, so that every thread is held only for what needs them all held:

    1. prepare, one thread held (:func:`_prepare_patches`): the patch mappings created,
       written whole, sealed, IFUNC slots resolved, unwind tables registered; nothing
       references them yet, so the other threads run on;
    2. switch, every thread held (:func:`_switch_stop`): the safety check, the jumps, a
       replaced level's other functions given their original bytes back;
    3. clean up, one thread held: replaced levels deregistered and unmapped (nothing jumps
       to them any more and step 2 saw no thread in or returning into them). When step 2
       fails, its writes are undone inside its stop and this step removes the prepared
       mappings instead: nothing is left.

    The time of the one-thread stops is added to ``patient.thread_ns``. When the stop
    :func:`stopping_with` gives already holds a thread (the service, at a process's exec),
    all three run inside that one stop, as they must (a held thread cannot be seized again).

    The order of writes makes every prefix a state the patient runs correctly in if the
    tool dies there (each named step is a fault-injection point, :mod:`..faults`): the
    patch mapping is created, written whole and sealed before any jump; each jump is one
    write, over a replaced level's jump where there is one; then a replaced level's
    other functions get their original bytes back; only then is it unmapped. A mapping
    left without (all) its jumps, none included, is what ``info`` reports as interrupted
    and what the next patch or unpatch finishes.
    """
    warm_caches(patient, [r for plan in plans for r in guarded_ranges_for_apply(plan)])
    stopped = _stop_process(pid, timeout=max(timeout, 1.0))
    if stopped.tids:
        return _apply_in_one_stop(stopped, patient, plans, timeout)
    journal = _prepare_patches(pid, patient, plans, timeout)
    try:
        paused_ns = _switch_stop(stopped, patient, plans, timeout, journal)
    except BaseException:
        _remove_prepared(pid, patient, journal, timeout)
        raise
    _clean_up_replaced(pid, patient, plans, timeout)
    return paused_ns


def _clean_up_replaced(pid: int, patient: Patient, plans: list[ObjectPlan], timeout: float) -> None:
    """Stop 3: replaced levels deregistered and unmapped with one thread held. The new
    levels are in force already: a failure here only leaves unreferenced mappings, which
    ``info`` reports as interrupted and the next patch or unpatch removes."""
    if all(plan.replaces is None for plan in plans):
        return
    try:
        with _one_thread(pid, patient, timeout, support_calls()) as worker:
            _unmap_replaced(worker, plans)
    except CareError:
        pass


@contextlib.contextmanager
def _one_thread(pid: int, patient: Patient, timeout: float, calls: list) -> Iterator[StoppedProcess]:
    """One thread of ``pid`` held for remote work (seccomp-vetted for ``calls``), the
    others running; its time is added to ``patient.thread_ns``."""
    worker = StoppedThread(pid, timeout=max(timeout, 1.0))
    try:
        with worker:
            check_seccomp(worker, calls)
            yield worker
    finally:
        patient.thread_ns += worker.paused_ns


def _patch_calls(plans: list[ObjectPlan]) -> list:
    """The system calls preparing ``plans`` makes in the patient (for the seccomp check)."""
    return [call for plan in plans for call in patch_mapping_calls(
        plan.linked.address, plan.linked.layout.mapping_size, plan.linked.layout.code_size)] + support_calls()


def _prepare_patches(pid: int, patient: Patient, plans: list[ObjectPlan], timeout: float) -> Journal:
    """Stop 1: every patch mapping made ready with one thread held (see
    :func:`_write_patches`); on failure what was made is removed. The journal of what
    was made."""
    with _one_thread(pid, patient, timeout, _patch_calls(plans)) as worker:
        journal = Journal(worker)
        try:
            _write_patches(worker, plans, journal)
        except BaseException:
            journal.rollback()
            raise
    return journal


def _switch_stop(stopped: StoppedProcess, patient: Patient, plans: list[ObjectPlan], timeout: float,
                 journal: Journal) -> int:
    """Stop 2, every thread held: safety check, jumps, restored bytes; a failure undoes
    the writes before the threads run. The pause in ns."""
    pid = stopped.pid
    with faults.step("stop", pid):
        stopped.stop()
    with stopped:
        # Threads run out of replaced code make system calls: each vetted before it does.
        check_seccomp(stopped, support_calls(), now=False)
        journal.patient = stopped
        try:
            ranges = [r for plan in plans for r in guarded_ranges_for_apply(plan)]
            with faults.step("safety-check", pid):
                wait_until_safe(stopped, patient, ranges, timeout, "patch")
            check_prepared(stopped, plans, journal)
            _switch_to_patches(stopped, plans, journal)
        except BaseException:
            journal.undo_writes()
            raise
        with faults.step("resume", pid):
            stopped.resume()
    return stopped.paused_ns


def _remove_prepared(pid: int, patient: Patient, journal: Journal, timeout: float) -> None:
    """After a failed switch: the prepared mappings deregistered and unmapped with one
    thread held. If even that fails they stay, without jumps: an interrupted run that
    ``info`` reports and the next patch or unpatch removes."""
    if not journal.mappings and not journal.tables:
        return
    try:
        with _one_thread(pid, patient, timeout, support_calls()) as worker:
            journal.patient = worker
            journal.remove_created()
    except CareError:
        pass


def _apply_in_one_stop(stopped: StoppedProcess, patient: Patient, plans: list[ObjectPlan], timeout: float) -> int:
    """Step 5 inside one stop of a process a caller holds a thread of (see :func:`stopping_with`)."""
    pid = stopped.pid
    with faults.step("stop", pid):
        stopped.stop()
    with stopped:
        check_seccomp(stopped, _patch_calls(plans))
        journal = Journal(stopped)
        try:
            _write_patches(stopped, plans, journal)
            ranges = [r for plan in plans for r in guarded_ranges_for_apply(plan)]
            with faults.step("safety-check", pid):
                wait_until_safe(stopped, patient, ranges, timeout, "patch")
            _switch_to_patches(stopped, plans, journal)
        except BaseException:
            journal.rollback()
            raise
        _unmap_replaced(stopped, plans)
        with faults.step("resume", pid):
            stopped.resume()
    return stopped.paused_ns


def _write_patches(stopped: StoppedProcess, plans: list[ObjectPlan], journal: Journal) -> None:
    """Steps 5a-5e: every patch mapping created, written whole, sealed, its IFUNC slots
    resolved and its unwind tables registered; nothing jumps to them yet."""
    pid = stopped.pid
    for plan in plans:
        with faults.step("mmap", pid):
            map_patch(stopped, plan, journal)
    originals = save_original_bytes(stopped, plans)
    for plan, saved in zip(plans, originals, strict=True):
        with faults.step("write-image", pid):
            write_patch(stopped, plan, saved)
        with faults.step("mprotect", pid):
            seal_code(stopped, plan)
        if plan.ifuncs:
            with faults.step("resolve-ifunc", pid):
                resolve_ifuncs(stopped, plan)
        register_patch_frames(stopped, plan, journal)


def _switch_to_patches(stopped: StoppedProcess, plans: list[ObjectPlan], journal: Journal) -> None:
    """Steps 5f-5g (threads out of the way): the jumps, each one write; then a replaced
    level's other functions get their original bytes back."""
    for plan in plans:
        write_jumps(stopped, plan, journal)
    for plan in plans:
        if plan.replaces is not None:
            taken_over = frozenset(entry.daddr for entry in plan.linked.entries if not entry.is_new)
            restore_functions(stopped, plan.replaces.all_mappings, journal, taken_over)


def check_unreferenced(stopped: StoppedProcess, applied: AppliedPatch) -> None:
    """ProcessError if a function jumps to ``applied`` now. Between the stops, another run
    may have taken a mapping this run prepared for a leftover, or the reverse, and put
    its jumps in since; a mapping is unmapped only while no function jumps to it (a
    one-thread stop holds off any other run's all-threads stop, so this holds until the
    unmap)."""
    sites = [entry for entry in applied.entries if not entry.is_new]
    current = read_ranges_lenient(stopped.pid, [(entry.daddr, JUMP_SIZE) for entry in sites]) if sites else []
    if any(data is not None and data == _jump_or_none(entry) for entry, data in zip(sites, current, strict=True)):
        raise ProcessError(f"functions jump to the level-{applied.level} patch at {applied.mapping.start:#x} "
                           "again (another run?): keeping it")


def check_prepared(stopped: StoppedProcess, plans: list[ObjectPlan], journal: Journal) -> None:
    """Each prepared mapping still holds what was written (its header, identity included).
    Else another run took it for a leftover and removed it between the stops: ProcessError,
    and the journal forgets the mappings (what is at their addresses now is not ours to
    unmap)."""
    found = read_ranges_lenient(stopped.pid, [(plan.linked.address, HEADER_SIZE) for plan in plans])
    if all(data == bytes(plan.linked.mapping[:HEADER_SIZE]) for plan, data in zip(plans, found, strict=True)):
        return
    journal.mappings.clear()
    journal.tables.clear()
    raise ProcessError(f"a patch mapping prepared in process {stopped.pid} was removed before the switch "
                       "(by another patch or unpatch run?); nothing was applied, try again")


def _unmap_replaced(stopped: StoppedProcess, plans: list[ObjectPlan]) -> None:
    """Step 5h: the mappings of replaced levels, unreferenced now, deregistered and unmapped."""
    for plan in plans:
        for replaced in plan.replaces.all_mappings if plan.replaces is not None else ():
            with faults.step("unmap-old", stopped.pid):
                try:
                    check_unreferenced(stopped, replaced)
                    release_frames(stopped, replaced, plan.registry)
                    stopped.munmap(replaced.mapping.start, replaced.total_size)
                except CareError:
                    pass    # unreferenced now; only memory is lost (the next patch or unpatch retries)


# ---------------------------------------------------------------------------- patch
def patch_process(pid: int, source: PatchSource, *, level: int | None = None, timeout: float = 5.0,
                  retries: int = 0, check: bool = False, force_unsafe: bool = False) -> ProcessResult:
    """Apply the source's patches to every matching object of process ``pid``.

    ``retries``: further whole attempts (stop, check, resume) after a busy refusal.
    ``force_unsafe``: patch although a stack the process may have switched to could not be
    found (never past a thread or stack proven to be inside a replaced function).
    """
    refuse_special(pid, "patch")
    patient = read_patient(pid)
    patient.force_unsafe = force_unsafe
    matches = match_patches(patient, source, level)
    results: dict[int, ObjectResult] = {}    # by MappedObject.start
    plans: list[ObjectPlan] = []
    taken: list[tuple[int, int]] = []
    for mapped, patch in matches:
        planned = _plan_or_result(patient, mapped, patch, taken)
        if isinstance(planned, ObjectPlan):
            plans.append(planned)
        else:
            results[mapped.start] = planned
    paused_us = None
    failure = ""
    if plans and not check:
        paused_us, failure = _apply_with_retries(pid, patient, plans, timeout, retries)
    for plan in plans:
        results[plan.mapped.start] = _plan_result(plan, patient, failure, paused_us, check)
    ordered = [results[m.start] for m, _ in matches if m.start in results]
    waited_us = patient.waited_ns // 1000 if plans and not check else None
    thread_us = patient.thread_ns // 1000 if plans and not check else None
    return ProcessResult(pid=pid, comm=patient.comm, objects=tuple(ordered), paused_us=paused_us, waited_us=waited_us,
                         thread_us=thread_us)


def _plan_or_result(patient: Patient, mapped: MappedObject, patch: PatchFile,
                    taken: list[tuple[int, int]]) -> ObjectPlan | ObjectResult:
    """Steps 2-4 for one object: its plan, or the result it gets without one (skipped or
    failed: everything is checked before any stop)."""
    applied = patient.applied.get(mapped.build_id or "")
    previous = applied.level if applied else None
    try:
        image = read_patch_image(patch)
        validate(image, patient.file_of(mapped), mapped.path)   # every field, before any stop
        decision = decide_level(image, applied)
        if decision.action in ("apply", "replace"):
            return plan_object(patient, mapped, image, taken, applied if decision.action == "replace" else None)
        return ObjectResult(path=mapped.path, build_id=mapped.build_id or "", action=decision.action,
                            applied_level=previous, previous_level=previous, reason=decision.reason,
                            functions=applied.replaced_functions if applied else image.replaced_functions)
    except CareError as exc:
        return ObjectResult(path=mapped.path, build_id=mapped.build_id or "", action=ObjectAction.FAILED,
                            applied_level=previous, previous_level=previous, reason=str(exc))


def _apply_with_retries(pid: int, patient: Patient, plans: list[ObjectPlan], timeout: float,
                        retries: int) -> tuple[int | None, str]:
    """Step 5, tried again after a busy refusal up to ``retries`` times: (pause in us or
    None, why it failed or "")."""
    paused_us = None
    failure = ""
    for attempt in range(retries + 1):
        try:
            paused_us = apply_plans(pid, patient, plans, timeout) // 1000
            break
        except UnsafeToPatch as exc:
            failure = str(exc)
            if attempt == retries:
                break
            failure = ""
        except CareError as exc:
            failure = str(exc)
            break
    if has_exited(pid):
        failure = f"process {pid} exited during patching; nothing was left in it"
    return paused_us, failure


def _plan_result(plan: ObjectPlan, patient: Patient, failure: str, paused_us: int | None,
                 check: bool) -> ObjectResult:
    """The result of a planned object: failed with ``failure``, else applied (or, in check
    mode, would have been)."""
    previous = plan.replaces.level if plan.replaces else None
    if failure:
        return ObjectResult(path=plan.mapped.path, build_id=plan.mapped.build_id or "", action=ObjectAction.FAILED,
                            applied_level=previous, previous_level=previous, reason=failure, paused_us=None,
                            functions=plan.image.replaced_functions)
    if plan.replaces is None:
        reason = f"level {plan.image.level} applied"
    elif plan.replaces.complete:
        reason = f"replaced level {previous} with level {plan.image.level}"
    else:
        reason = f"replaced an incomplete level-{previous} patch with level {plan.image.level}"
    if check:
        reason = "would have " + reason
    if patient.forced:
        reason += f"; FORCED (force_unsafe) although {patient.forced[0]}"
    return ObjectResult(path=plan.mapped.path, build_id=plan.mapped.build_id or "", action=ObjectAction.APPLIED,
                        applied_level=plan.image.level, previous_level=previous, reason=reason, paused_us=paused_us,
                        functions=plan.image.replaced_functions)


# ---------------------------------------------------------------------------- unpatch
def unpatch_process(pid: int, build_ids: list[str] | None = None, *, timeout: float = 5.0,
                    check: bool = False) -> ProcessResult:
    """Remove applied patches (all, or those for ``build_ids``) from process ``pid``, with
    the leftovers of interrupted runs. A patch whose functions got their original bytes
    back but whose mapping could not be unmapped is reported failed, saying so."""
    refuse_special(pid, "unpatch")
    patient = read_patient(pid)
    paths = {m.build_id: m.path for m in patient.objects if m.build_id}
    selected = _selected_patches(patient, build_ids, paths)
    if not selected:
        return ProcessResult(pid=pid, comm=patient.comm)
    paused_us = None
    failure = ""
    unmap_failed: dict[str, str] = {}      # build-id -> what could not be unmapped
    if not check:
        try:
            paused_us = _remove_patches(pid, patient, selected, timeout, unmap_failed) // 1000
        except CareError as exc:
            failure = str(exc)
        if has_exited(pid):
            failure = f"process {pid} exited during unpatching; nothing was left in it"
    results = [_removal_result(applied, paths.get(applied.build_id, f"[kpatch-{applied.build_id}]"), failure,
                               unmap_failed, paused_us, check) for applied in selected]
    return ProcessResult(pid=pid, comm=patient.comm, objects=tuple(results), paused_us=paused_us,
                         waited_us=None if check else patient.waited_ns // 1000,
                         thread_us=None if check else patient.thread_ns // 1000)


def _selected_patches(patient: Patient, build_ids: list[str] | None, paths: dict[str, str]) -> list[AppliedPatch]:
    """The applied patches named by ``build_ids`` (a build-id, an object's path or file
    name), or all of them."""
    wanted = {b.lower() for b in build_ids} | set(build_ids) if build_ids else None
    return [a for a in patient.applied.values() if wanted is None or a.build_id in wanted
            or os.path.basename(paths.get(a.build_id, "")) in wanted or paths.get(a.build_id) in wanted]


def _remove_patches(pid: int, patient: Patient, selected: list[AppliedPatch], timeout: float,
                    unmap_failed: dict[str, str]) -> int:
    """Stop every thread and give the replaced functions their original bytes back (all or
    nothing); then, with one thread held, deregister and unmap the patches. The pause
    (every thread stopped) in ns. An unmap that fails is noted in ``unmap_failed`` (by
    build-id), not raised. When the stop :func:`stopping_with` gives already holds a
    thread, the unmaps are made inside that one stop."""
    everything = [mapping for applied in selected for mapping in applied.all_mappings]
    warm_caches(patient, [guarded_patch_range(a) for a in everything])
    registry = frame_registry(patient) if any(a.tables for a in everything) else None   # files: before the stop
    calls = [call for applied in everything for call in patch_mapping_calls(
        applied.mapping.start, applied.total_size, applied.mapping.size)] + support_calls()
    stopped = _stop_process(pid, timeout=max(timeout, 1.0))
    held = bool(stopped.tids)          # a caller holds a thread (the service): unmap in the same stop
    with faults.step("stop", pid):
        stopped.stop()
    with stopped:
        check_seccomp(stopped, calls if held else support_calls(), now=held)
        journal = Journal(stopped)
        try:
            with faults.step("safety-check", pid):
                wait_until_safe(stopped, patient, [guarded_patch_range(a) for a in everything], timeout,
                                "unpatch")
            for applied in selected:
                restore_functions(stopped, applied.all_mappings, journal)
        except BaseException:
            journal.rollback()
            raise
        if held:
            _unmap_removed(stopped, everything, registry, unmap_failed)
        with faults.step("resume", pid):
            stopped.resume()
    if not held:
        _unmap_in_one_thread(pid, patient, timeout, calls, (everything, registry, unmap_failed))
    return stopped.paused_ns


def _unmap_in_one_thread(pid: int, patient: Patient, timeout: float, calls: list,
                         removal: tuple[list[AppliedPatch], FrameRegistry | None, dict[str, str]]) -> None:
    """:func:`_unmap_removed` with one thread held; a stop that fails is noted for each
    patch (their functions have their original bytes back: only unused mappings stay)."""
    everything, registry, unmap_failed = removal
    try:
        with _one_thread(pid, patient, timeout, calls) as worker:
            _unmap_removed(worker, everything, registry, unmap_failed)
    except CareError as exc:
        for applied in everything:
            unmap_failed.setdefault(applied.build_id, _unmap_failure(applied, exc))


def _unmap_failure(applied: AppliedPatch, exc: CareError) -> str:
    """The reason reported for a removed patch whose mapping could not be unmapped."""
    return (f"the original code runs again, but the level-{applied.level} patch at {applied.mapping.start:#x} "
            f"could not be unmapped ({exc}); run unpatch again to remove it")


def _unmap_removed(stopped: StoppedProcess, everything: list[AppliedPatch], registry: FrameRegistry | None,
                   unmap_failed: dict[str, str]) -> None:
    """Nothing jumps to them any more: their unwind tables deregistered (through
    ``registry``) and unmapped. An unmap that fails leaves an unused mapping: reported, and
    removed by the next patch or unpatch."""
    for applied in everything:
        with faults.step("unmap", stopped.pid):
            try:
                check_unreferenced(stopped, applied)
                release_frames(stopped, applied, registry)
                stopped.munmap(applied.mapping.start, applied.total_size)
            except CareError as exc:
                unmap_failed[applied.build_id] = _unmap_failure(applied, exc)


def _removal_result(applied: AppliedPatch, path: str, failure: str, unmap_failed: dict[str, str],
                    paused_us: int | None, check: bool) -> ObjectResult:
    """The result for one selected patch: failed (the whole stop, or its unmap), else removed."""
    if failure:
        return ObjectResult(path=path, build_id=applied.build_id, action=ObjectAction.FAILED,
                            applied_level=applied.level, previous_level=applied.level, reason=failure,
                            paused_us=None, functions=applied.replaced_functions)
    if applied.build_id in unmap_failed:
        return ObjectResult(path=path, build_id=applied.build_id, action=ObjectAction.FAILED,
                            applied_level=None, previous_level=applied.level,
                            reason=unmap_failed[applied.build_id], paused_us=paused_us,
                            functions=applied.replaced_functions)
    reason = f"level {applied.level} {'would be ' if check else ''}removed"
    return ObjectResult(path=path, build_id=applied.build_id, action=ObjectAction.REMOVED, applied_level=None,
                        previous_level=applied.level, reason=reason, paused_us=paused_us,
                        functions=applied.replaced_functions)


# ---------------------------------------------------------------------------- info
def info_process(pid: int, source: PatchSource | None = None) -> ProcessInfo:
    """What is mapped and applied in process ``pid`` (memory reads only, never ptrace)."""
    patient = read_patient(pid)
    objects = []
    seen_ids: set[str] = set()
    for mapped in patient.objects:
        applied = patient.applied.get(mapped.build_id or "")
        available = None
        if source is not None and mapped.build_id:
            try:
                found = source.find(mapped.build_id)
            except CareError:
                found = None
            available = found.level if found is not None else None
        if mapped.build_id:
            seen_ids.add(mapped.build_id)
        in_force = applied is not None and applied.in_force
        objects.append(ObjectInfo(mapped.path, mapped.build_id, applied.level if in_force else None, available,
                                  applied.replaced_functions if in_force else (),
                                  applied.interrupted() if applied is not None else ""))
    for build_id, applied in patient.applied.items():
        if build_id not in seen_ids:
            objects.append(ObjectInfo(f"[kpatch-{build_id}]", build_id, applied.level, None,
                                      applied.replaced_functions, applied.interrupted()))
    unpatchable = ""
    if not any(m.build_id for m in patient.objects):
        unpatchable = "no mapped object has a GNU build-id"
    return ProcessInfo(pid, patient.comm, tuple(objects), unpatchable)
