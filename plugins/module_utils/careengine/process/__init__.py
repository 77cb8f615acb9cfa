"""A live process as the tracer sees it: maps, objects, memory, stopped threads.

The only package that touches a live process; ``apply/`` uses it like this::

    mappings = read_maps(pid)                      # no stop needed for any of these
    objects = mapped_objects(pid, mappings)        # build-ids from the patient's memory
    applied = find_applied_patches(pid, mappings)
    with StoppedProcess(pid) as patient:           # every thread stopped, new ones too
        address = patient.mmap(hint, size, prot, flags)
        patient.write(address, image)
        target = patient.remote_call(resolver, (), return_stub)   # CALL_RETURN_STUB placed there
        stacks = read_ranges(pid, [(rsp, end - rsp), ...])
        patient.run_for(0.01)                       # let it run, stop it all again
    print(patient.paused_ns)                        # leaving the block detaches everything

Errors: ``ProcessGone`` (no such process, or it exited), ``PermissionDenied`` (needs root
or CAP_SYS_PTRACE, or another tracer holds it), ``ProcessError`` (anything else;
``RemoteSyscallFailed`` carries the errno of a failed remote syscall).
"""

from . import realtime
from .loaded_objects import PATCH_HEADER_SIZE, PATCH_MAGIC, MappedObject, find_applied_patches, mapped_objects
from .maps import Mapping, free_holes, page_down, page_up, parse_maps, proc_status, read_maps
from .memory import forget_process, read_memory, read_ranges, read_ranges_lenient, write_memory
from .tracer import (
    CALL_RETURN_STUB,
    Registers,
    RemoteSyscallFailed,
    ReturnSites,
    StoppedProcess,
    find_return_sites,
    find_syscall_instruction,
    signed64,
)

__all__ = [
    "CALL_RETURN_STUB",
    "PATCH_HEADER_SIZE",
    "PATCH_MAGIC",
    "MappedObject",
    "Mapping",
    "Registers",
    "RemoteSyscallFailed",
    "ReturnSites",
    "StoppedProcess",
    "find_applied_patches",
    "find_return_sites",
    "find_syscall_instruction",
    "forget_process",
    "free_holes",
    "mapped_objects",
    "page_down",
    "page_up",
    "parse_maps",
    "proc_status",
    "read_maps",
    "read_memory",
    "read_ranges",
    "read_ranges_lenient",
    "realtime",
    "signed64",
    "write_memory",
]
