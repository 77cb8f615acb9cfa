"""The patch store: patches by target build-id and patch level.

Layout (LibCare's)::

    <store>/<build-id>/<level>/kpatch.bin
    <store>/<build-id>/latest -> <level>        (the level in force)
    <store>/<build-id>.kpatch                   (flat form, level from its header)

    <store>/SHA256SUMS                          (digest of every patch file, see integrity)
    <store>/SHA256SUMS.sig                      (optional OpenSSH signature of SHA256SUMS)

A :class:`PatchSource` is what ``libcare-ctl patch`` and the ``livepatch`` module take:
either a store directory or a single patch file. Unless told not to verify, it hands out
only patches whose bytes have the digest its ``SHA256SUMS`` lists (a single file: the
``SHA256SUMS`` in its own directory), and with ``allowed_signers`` only from a store whose
``SHA256SUMS`` is signed by an allowed key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import PatchFormatError, StoreError
from .integrity import IntegrityError, check_listed, read_sums, sums_directory, verify_signature, write_sums
from .patchfile import PatchFile, decode_patch, load_patch, normalize_build_id

PATCH_FILENAME = "kpatch.bin"
LATEST_LINK = "latest"
FLAT_SUFFIX = ".kpatch"
DEFAULT_STORE = "/var/lib/libcare"


@dataclass(frozen=True)
class StoredPatch:
    """A patch found in a source: where it is and the level it applies at."""

    build_id: str
    level: int
    path: str


class PatchStore:
    """A patch store directory (see the module docstring for its layout)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def _level_dir(self, build_id: str, level: int) -> str:
        return os.path.join(self.root, build_id, str(level))

    def levels(self, build_id: str) -> list[int]:
        """The levels stored for ``build_id``, ascending."""
        directory = os.path.join(self.root, build_id)
        if not os.path.isdir(directory):
            return []
        found = []
        for entry in os.listdir(directory):
            if entry.isdigit() and os.path.isfile(os.path.join(directory, entry, PATCH_FILENAME)):
                found.append(int(entry))
        return sorted(found)

    def latest_level(self, build_id: str) -> int | None:
        """The level ``latest`` points to, or None when there is no ``latest`` link."""
        link = os.path.join(self.root, build_id, LATEST_LINK)
        if not os.path.lexists(link):
            return None
        target = os.path.basename(os.path.normpath(os.readlink(link))) if os.path.islink(link) else None
        if target is None or not target.isdigit():
            raise StoreError(f"{link} must be a symlink to a numeric patch level directory")
        return int(target)

    def find(self, build_id: str, level: int | None = None) -> StoredPatch | None:
        """The patch for ``build_id`` at ``level`` (default: ``latest``, else the flat file)."""
        build_id = normalize_build_id(build_id)
        if level is None:
            level = self.latest_level(build_id)
        if level is not None:
            path = os.path.join(self._level_dir(build_id, level), PATCH_FILENAME)
            if os.path.isfile(path):
                return StoredPatch(build_id, level, path)
            if self.latest_level(build_id) == level:
                raise StoreError(f"{path} is missing although 'latest' points to level {level}")
            return None
        flat = os.path.join(self.root, build_id + FLAT_SUFFIX)
        if os.path.isfile(flat):
            return StoredPatch(build_id, load_patch(flat).level, flat)
        return None

    def build_ids(self) -> list[str]:
        """Every build-id the store holds a patch for."""
        if not os.path.isdir(self.root):
            return []
        found = set()
        for entry in os.listdir(self.root):
            name = entry[: -len(FLAT_SUFFIX)] if entry.endswith(FLAT_SUFFIX) else entry
            try:
                build_id = normalize_build_id(name)
            except Exception:
                continue
            if self.find(build_id) is not None:
                found.add(build_id)
        return sorted(found)

    def install(self, patch: PatchFile, level: int, make_latest: bool = True) -> str:
        """Store ``patch`` at ``level`` and point ``latest`` at it; return its path.

        Installing the very same bytes again is a no-op; a different patch at an
        existing level is refused (a fix must get a new level).
        """
        data = patch.with_level(level).to_bytes()
        directory = self._level_dir(patch.build_id, level)
        path = os.path.join(directory, PATCH_FILENAME)
        if os.path.isfile(path):
            with open(path, "rb") as stream:
                if _same_patch(stream.read(), data):
                    if make_latest:
                        self._point_latest(patch.build_id, level)
                    return path
            raise StoreError(
                f"{path}: a different patch is already stored at level {level}; use a higher level"
            )
        os.makedirs(directory, exist_ok=True)
        temporary = path + ".tmp"
        with open(temporary, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
        write_sums(self.root)
        if make_latest:
            self._point_latest(patch.build_id, level)
        return path

    def _point_latest(self, build_id: str, level: int) -> None:
        link = os.path.join(self.root, build_id, LATEST_LINK)
        temporary = link + ".tmp"
        if os.path.lexists(temporary):
            os.unlink(temporary)
        os.symlink(str(level), temporary)
        os.replace(temporary, link)


def _same_patch(stored: bytes, new: bytes) -> bool:
    """Equal patches, ignoring the build time in the header (bytes 336..344)."""
    return stored[:336] == new[:336] and stored[344:] == new[344:]


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as exc:
        raise PatchFormatError(f"cannot read patch file {path}: {exc.strerror}") from None


class PatchSource:
    """Where patches come from: a store directory or one patch file.

    ``verify`` (default): refuse a directory without ``SHA256SUMS`` at once, and hand out
    only patches whose digest it lists. ``allowed_signers``: also require ``SHA256SUMS.sig``
    to verify with that ``allowed_signers`` file (the signer is kept in :attr:`signer`).
    Everything is checked here, before the engine touches any process.
    """

    def __init__(self, path: str, *, verify: bool = True, allowed_signers: str | None = None) -> None:
        if not os.path.exists(path):
            raise StoreError(f"patch source {path} does not exist")
        if allowed_signers and not verify:
            raise IntegrityError("--allowed-signers and --no-verify exclude each other")
        self.path = path
        self.store = PatchStore(path) if os.path.isdir(path) else None
        self.verified = verify
        self.signer: str | None = None
        self.sums_dir = sums_directory(path)
        self._sums: dict[str, str] | None = None
        self._checked: dict[tuple[str, int, int], PatchFile] = {}
        if verify:
            self._sums = read_sums(self.sums_dir)
            if self._sums is None:
                what = "patch store" if self.store is not None else f"directory of {path}"
                raise IntegrityError(f"the {what} {self.sums_dir} has no SHA256SUMS: cannot check the patches "
                                     "(rebuild them with libcare-patch-make, or apply unverified with --no-verify)")
            if allowed_signers:
                self.signer = verify_signature(self.sums_dir, allowed_signers)
        self._single: PatchFile | None = None if self.store else self._read(path)

    def _read(self, path: str) -> PatchFile:
        """Decode the patch at ``path``; when verifying, from the very bytes whose digest was checked."""
        if not self.verified:
            return load_patch(path)
        try:
            status = os.stat(path)
        except OSError as exc:
            raise PatchFormatError(f"cannot read patch file {path}: {exc.strerror}") from None
        key = (path, status.st_size, status.st_mtime_ns)
        cached = self._checked.get(key)
        if cached is None:
            raw = _read_bytes(path)
            assert self._sums is not None
            check_listed(self.sums_dir, self._sums, path, raw)
            cached = self._checked[key] = decode_patch(raw, source=path)
        return cached

    def find(self, build_id: str) -> StoredPatch | None:
        """The patch to apply to the object with ``build_id``, or None."""
        if self.store is not None:
            return self.store.find(build_id)
        assert self._single is not None
        if self._single.build_id == normalize_build_id(build_id):
            return StoredPatch(self._single.build_id, self._single.level, self.path)
        return None

    def build_ids(self) -> list[str]:
        """Every build-id this source has a patch for."""
        if self.store is not None:
            return self.store.build_ids()
        assert self._single is not None
        return [self._single.build_id]

    def load(self, found: StoredPatch) -> PatchFile:
        """Read the patch found by :meth:`find`, with its level set (checked against
        ``SHA256SUMS`` unless the source does not verify)."""
        if self._single is not None and found.path == self.path:
            return self._single.with_level(found.level)
        return self._read(found.path).with_level(found.level)
