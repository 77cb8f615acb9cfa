"""Who may change what ``libcare-ctl`` loads into processes: owners and modes of the patch source.

Root writes a stored patch into any process on the host, so whoever can change a patch,
the store around it or a directory above it can run code as root. Like sshd's
``StrictModes`` for ``authorized_keys``, when we run as root every path the patches are
reached through must be root's and writable by root only:

- every directory looked into on the way (``/``, ``/var``, ..., the store's parent), and
  the symlinks followed on the way (and their targets' paths): owned by root, not writable
  by group or others, except that a sticky directory such as ``/tmp`` may be (nobody but
  root can then rename or remove the root-owned entry below it);
- the store directory itself and everything below it (build-id and level directories,
  ``latest`` links and their targets, patch files, ``SHA256SUMS``, ``SHA256SUMS.sig``):
  owned by root, not writable by group or others;
- a single patch file given instead of a store: the file, the directories above it and the
  ``SHA256SUMS`` / ``SHA256SUMS.sig`` beside it, by the same rules.

The check only reads metadata; it runs before anything else reads a patch or touches a
process. Running as another user, nothing is checked: such a user can only trace its own
processes, which it could change anyway.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass

from .errors import InsecureStore, StoreError

INTEGRITY_FILES = ("SHA256SUMS", "SHA256SUMS.sig")
MAX_SYMLINK_DEPTH = 40               # as the kernel's ELOOP limit
WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class UnsafePath:
    """A path someone other than root could change, and why."""

    path: str
    uid: int
    mode: int                        # the full st_mode (type and permission bits)
    problem: str                     # e.g. "not owned by root", "writable by group"

    @property
    def owner(self) -> str:
        """The owner's user name (its uid when it has none)."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"

    def describe(self) -> str:
        """``PATH (owner NAME, mode 0775) is writable by group``."""
        return f"{self.path} (owner {self.owner}, mode {stat.S_IMODE(self.mode):04o}) is {self.problem}"


def check_patch_source(source: str, *, euid: int | None = None) -> None:
    """Raise :class:`InsecureStore` when someone but root could change the patches of ``source``.

    ``source`` is a store directory or one patch file. Nothing is checked when ``euid``
    (default: ours) is not 0. A source that does not exist is left to the caller to report.
    """
    if (os.geteuid() if euid is None else euid) != 0:
        return
    unsafe = find_unsafe_path(source)
    if unsafe is not None:
        raise InsecureStore(
            f"refusing patch source {source}: {unsafe.describe()}; only root may be able to change what is "
            f"loaded into processes (chown root and chmod go-w it, or pass --insecure-store in a test or lab)")


def find_unsafe_path(source: str) -> UnsafePath | None:
    """The first path of ``source`` (store or patch file) that fails the rules above, or None."""
    if not os.path.lexists(source):
        return None
    walker = _Walker()
    try:
        resolved = walker.resolve(source)
        walker.check_owned(resolved)
        if os.path.isdir(resolved):
            walker.check_tree(resolved)
        else:
            for name in INTEGRITY_FILES:
                beside = os.path.join(os.path.dirname(resolved), name)
                if os.path.lexists(beside):
                    walker.check_owned(walker.resolve(beside))
    except _Unsafe as unsafe:
        return unsafe.path
    except FileNotFoundError:
        return None                            # a dangling link: the caller reports the missing source
    return None


class _Unsafe(Exception):
    """Carries the first unsafe path out of the walk."""

    def __init__(self, path: UnsafePath) -> None:
        super().__init__(path.describe())
        self.path = path


class _Walker:
    """Resolves paths one component at a time, checking each directory and symlink on the way."""

    def __init__(self) -> None:
        self._containers: set[str] = set()     # directories already checked as a way through
        self._owned: set[str] = set()          # paths already checked as part of the source
        self._trees: set[tuple[int, int]] = set()

    def resolve(self, path: str, depth: int = 0) -> str:
        """The real path of ``path``; every directory looked into and every symlink followed is checked."""
        if depth > MAX_SYMLINK_DEPTH:
            raise StoreError(f"too many levels of symbolic links resolving {path}")
        if not os.path.isabs(path):
            path = os.path.join(os.getcwd(), path)
        names = [name for name in path.split("/") if name not in ("", ".")]
        current = "/"
        self._check_container(current)
        for index, name in enumerate(names):
            if name == "..":
                current = os.path.dirname(current)
                continue
            candidate = os.path.join(current, name)
            status = _lstat(candidate)
            if stat.S_ISLNK(status.st_mode):
                _require_root_owner(candidate, status)
                target = os.readlink(candidate)
                current = self.resolve(target if os.path.isabs(target) else os.path.join(current, target), depth + 1)
            else:
                current = candidate
            if index < len(names) - 1:
                self._check_container(current)
        return current

    def _check_container(self, directory: str) -> None:
        """A directory we look a name up in: root's; writable by others only if sticky."""
        if directory in self._containers:
            return
        status = _lstat(directory)
        _require_root_owner(directory, status)
        if status.st_mode & WRITABLE_BY_OTHERS and not status.st_mode & stat.S_ISVTX:
            raise _Unsafe(UnsafePath(directory, status.st_uid, status.st_mode, _writable_by(status.st_mode)))
        self._containers.add(directory)

    def check_owned(self, path: str) -> None:
        """A path of the source itself (resolved): root's and writable by root only."""
        if path in self._owned:
            return
        status = _lstat(path)
        _require_root_owner(path, status)
        if status.st_mode & WRITABLE_BY_OTHERS:
            raise _Unsafe(UnsafePath(path, status.st_uid, status.st_mode, _writable_by(status.st_mode)))
        self._owned.add(path)

    def check_tree(self, directory: str) -> None:
        """Everything below the (resolved, checked) store ``directory``, following symlinks once."""
        status = os.stat(directory)
        if (status.st_dev, status.st_ino) in self._trees:
            return
        self._trees.add((status.st_dev, status.st_ino))
        self._containers.add(directory)        # checked by check_owned, which is stricter
        try:
            entries = sorted(os.listdir(directory))
        except OSError as exc:
            raise StoreError(f"cannot list {directory}: {exc.strerror}") from None
        for name in entries:
            try:
                resolved = self.resolve(os.path.join(directory, name))
            except FileNotFoundError:
                continue                       # removed meanwhile, or a dangling symlink: loads nothing
            self.check_owned(resolved)
            if os.path.isdir(resolved):
                self.check_tree(resolved)


def _lstat(path: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot check the owner and mode of {path}: {exc.strerror}") from None


def _require_root_owner(path: str, status: os.stat_result) -> None:
    if status.st_uid != 0:
        raise _Unsafe(UnsafePath(path, status.st_uid, status.st_mode, "not owned by root"))


def _writable_by(mode: int) -> str:
    whom = [who for bit, who in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if mode & bit]
    return "writable by " + " and ".join(whom)


__all__ = ["INTEGRITY_FILES", "UnsafePath", "check_patch_source", "find_unsafe_path"]
