"""Which files on the host are objects the store has a patch for.

Two sources: the objects running processes map (``/proc/PID/maps``), and the files of a few
directories (the usual program and library directories, plus any the operator names).
Facts are cached per file identity, so a rescan reads only new or changed files.
"""

from __future__ import annotations

import os

from .catch import Target
from .elfscan import ElfFacts, elf_facts

DEFAULT_SEARCH_PATHS = (
    "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin",
    "/usr/lib/x86_64-linux-gnu", "/usr/local/lib", "/usr/lib",
)

# (dev, inode, size, mtime) -> facts (None: not an ELF file)
_facts_cache: dict[tuple[int, int, int, int], ElfFacts | None] = {}


def _facts(path: str, status: os.stat_result) -> ElfFacts | None:
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    if key not in _facts_cache:
        _facts_cache[key] = elf_facts(path)
    return _facts_cache[key]


def _candidate_files(search_paths: tuple[str, ...]) -> list[str]:
    files = []
    for path in search_paths:
        if os.path.isfile(path):
            files.append(path)
            continue
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        files.extend(entry.path for entry in entries if entry.is_file())
    return files


def _mapped_files() -> list[str]:
    files = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps", encoding="utf-8", errors="replace") as stream:
                for line in stream:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
                        files.add(fields[5].rstrip("\n"))
        except OSError:
            continue
    return sorted(files)


def find_targets(build_ids: set[str], search_paths: tuple[str, ...]) -> dict[tuple[int, int], Target]:
    """(dev, inode) -> :class:`Target`, for every file found whose build-id is in ``build_ids``."""
    targets: dict[tuple[int, int], Target] = {}
    if not build_ids:
        return targets
    for path in [*_mapped_files(), *_candidate_files(search_paths)]:
        try:
            status = os.stat(path)
        except OSError:
            continue
        identity = (status.st_dev, status.st_ino)
        if identity in targets or not os.path.isfile(path):
            continue
        facts = _facts(path, status)
        if facts is None or facts.build_id not in build_ids:
            continue
        targets[identity] = Target(os.path.realpath(path), facts.build_id, status.st_ino, facts.has_interp,
                                   facts.relro_offset is not None)
    return targets
