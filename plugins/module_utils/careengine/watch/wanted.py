"""The wanted state the store records: every build-id at its ``latest`` level, except
build-ids an operator unpatched while the service ran.

``libcare-ctl unpatch`` through the service writes ``<store>/<build-id>/unpatched`` with the
level it removed; the service then stops applying that build-id until another level is
published (``latest`` moves) or ``libcare-ctl patch`` asks for it again (the mark is removed).
So the service converges to what the operator last said and never fights them.
"""

from __future__ import annotations

import os

from ..errors import CareError
from ..patchfile import normalize_build_id
from ..storage import PatchSource, PatchStore, StoredPatch

UNPATCHED_MARK = "unpatched"


def _mark_path(root: str, build_id: str) -> str:
    return os.path.join(root, build_id, UNPATCHED_MARK)


def unpatched_level(root: str, build_id: str) -> int | None:
    """The level an operator unpatched for ``build_id``, or None."""
    try:
        with open(_mark_path(root, build_id), encoding="ascii") as stream:
            return int(stream.read().strip())
    except (OSError, ValueError):
        return None


def mark_unpatched(root: str, build_id: str, level: int) -> None:
    """Record that ``build_id`` at ``level`` is not wanted any more."""
    os.makedirs(os.path.join(root, build_id), mode=0o755, exist_ok=True)
    temporary = _mark_path(root, build_id) + ".tmp"
    with open(temporary, "w", encoding="ascii") as stream:
        stream.write(f"{level}\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, _mark_path(root, build_id))


def clear_unpatched(root: str, build_id: str) -> bool:
    """Want ``build_id`` again; True if it had been unpatched."""
    try:
        os.unlink(_mark_path(root, build_id))
        return True
    except FileNotFoundError:
        return False


class WantedStore(PatchStore):
    """A store that hides the patches an operator unpatched (at the level they removed)."""

    def find(self, build_id: str, level: int | None = None) -> StoredPatch | None:
        found = super().find(build_id, level)
        if found is not None and unpatched_level(self.root, normalize_build_id(build_id)) == found.level:
            return None
        return found


def wanted_source(root: str) -> PatchSource:
    """The store at ``root`` as a patch source that offers only the wanted patches."""
    source = PatchSource(root)
    source.store = WantedStore(root)
    return source


def wanted_levels(root: str) -> dict[str, int]:
    """build-id -> level, for every patch the service should keep applied."""
    store = WantedStore(root)
    levels = {}
    for build_id in store.build_ids():
        try:
            found = store.find(build_id)
        except CareError:
            continue
        if found is not None:
            levels[build_id] = found.level
    return levels


def store_signature(root: str) -> tuple:
    """A cheap fingerprint of the store: it changes when anything is published or unpatched."""
    entries = []
    try:
        scanned = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError:
        return ()
    for entry in scanned:
        try:
            status = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        item = [entry.name, status.st_mtime_ns, status.st_size]
        if entry.is_dir(follow_symlinks=False):
            for name in ("latest", UNPATCHED_MARK):
                path = os.path.join(entry.path, name)
                try:
                    item.append(os.readlink(path) if name == "latest" else os.stat(path).st_mtime_ns)
                except OSError:
                    item.append(None)
        entries.append(tuple(item))
    return tuple(entries)
