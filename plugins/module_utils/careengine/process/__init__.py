"""A live process as the tracer sees it: maps, objects, memory, stopped threads.

The only package that touches a live process. ``apply/`` uses it like this::

    with StoppedProcess(pid) as patient:
        address = patient.mmap(hint, size, prot, flags)
        patient.write(address, image)
"""

from .maps import Mapping, free_holes, page_down, page_up, parse_maps, read_maps
from .memory import forget_process, read_memory, read_ranges, read_ranges_lenient, write_memory
from .objects import PATCH_HEADER_SIZE, PATCH_MAGIC, MappedObject, find_applied_patches, mapped_objects
from .tracer import Registers, RemoteSyscallFailed, StoppedProcess, find_syscall_instruction, signed64

__all__ = [
    "PATCH_HEADER_SIZE",
    "PATCH_MAGIC",
    "MappedObject",
    "Mapping",
    "Registers",
    "RemoteSyscallFailed",
    "StoppedProcess",
    "find_applied_patches",
    "find_syscall_instruction",
    "forget_process",
    "free_holes",
    "mapped_objects",
    "page_down",
    "page_up",
    "parse_maps",
    "read_maps",
    "read_memory",
    "read_ranges",
    "read_ranges_lenient",
    "signed64",
    "write_memory",
]
