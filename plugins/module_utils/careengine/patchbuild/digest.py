"""Is a build up to date? A digest of its inputs, and the manifest of the last build.

The digest covers the source files of a tree (build outputs left out), the source
patches in order and the make arguments; the manifest, kept in the patch store, holds
the digest of the last successful build, the files that build produced and the patches
it stored. A builder rebuilds only when the digest changed or a stored patch is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..elf import ELF_MAGIC

if TYPE_CHECKING:
    from .project_build import BuiltPatch

# Directories that only ever hold build state, never sources.
SKIPPED_DIRS = frozenset((".git", ".hg", ".svn", "lpmake", "patchroot", ".lpmaketmp", "__pycache__"))
# Build products recognisable by name; ELF files are recognised by their magic as well.
SKIPPED_SUFFIXES = (".o", ".a", ".so", ".lo", ".la", ".pyc")
MANIFEST_PREFIX = ".livepatch_build."
_CHUNK = 65536


def file_digest(path: str) -> str | None:
    """sha256 of a file's content (of the link text for a symlink), or None for an ELF file."""
    if os.path.islink(path):
        return hashlib.sha256(os.readlink(path).encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        head = stream.read(_CHUNK)
        if head.startswith(ELF_MAGIC):
            return None
        while head:
            digest.update(head)
            head = stream.read(_CHUNK)
    return digest.hexdigest()


def _is_build_product(name: str) -> bool:
    return name.endswith(SKIPPED_SUFFIXES) or ".so." in name


def tree_files(src: str, excluded: Iterable[str] = (), skip_dir: str | None = None) -> dict[str, str]:
    """``{relative path: content digest}`` of the source files under ``src``.

    Skips build-state directories, ``skip_dir`` (a real path: the store when it lies inside
    ``src``), object files, ELF files and the relative paths in ``excluded`` (what an
    earlier build produced).
    """
    excluded = set(excluded)
    files = {}
    for top, dirs, names in os.walk(src):
        dirs[:] = sorted(
            d for d in dirs
            if d not in SKIPPED_DIRS and os.path.realpath(os.path.join(top, d)) != skip_dir
        )
        for name in names:
            if _is_build_product(name):
                continue
            path = os.path.join(top, name)
            relative = os.path.relpath(path, src)
            if relative in excluded or not (os.path.isfile(path) or os.path.islink(path)):
                continue
            content = file_digest(path)
            if content is not None:
                files[relative] = content
    return files


def build_digest(files: Mapping[str, str], patches: Iterable[str], make_args: Iterable[str]) -> str:
    """One digest over the source files, the patches (in order) and the make arguments."""
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(b"patch\0" + (file_digest(patch) or "").encode() + b"\0")
    for argument in make_args:
        digest.update(b"make_arg\0" + argument.encode() + b"\0")
    for relative in sorted(files):
        digest.update(b"file\0" + relative.encode() + b"\0" + files[relative].encode() + b"\0")
    return digest.hexdigest()


def manifest_path(dest: str, src: str) -> str:
    """Where the manifest of the last build of ``src`` into the store ``dest`` is kept."""
    key = hashlib.sha256(os.path.realpath(src).encode()).hexdigest()[:16]
    return os.path.join(dest, MANIFEST_PREFIX + key + ".json")


@dataclass(frozen=True)
class BuildManifest:
    """The last successful build of a source tree into a store."""

    src: str | None = None
    digest: str | None = None
    outputs: tuple[str, ...] = ()
    patches: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def is_current(self, digest: str) -> bool:
        """The build with this digest was done and every patch it stored is still there."""
        return (
            self.digest == digest
            and bool(self.patches)
            and all(os.path.isfile(patch.get("path", "")) for patch in self.patches)
        )

    def as_json(self) -> dict[str, Any]:
        """The manifest as written to its file."""
        return {"src": self.src, "digest": self.digest, "outputs": list(self.outputs), "patches": list(self.patches)}


def read_manifest(path: str) -> BuildManifest:
    """The manifest at ``path``, or an empty one when it is missing or unreadable."""
    try:
        with open(path) as stream:
            stored = json.load(stream)
    except (OSError, ValueError):
        return BuildManifest()
    if not isinstance(stored, dict):
        return BuildManifest()
    return BuildManifest(
        src=stored.get("src"),
        digest=stored.get("digest"),
        outputs=tuple(stored.get("outputs") or ()),
        patches=tuple(patch for patch in stored.get("patches") or () if isinstance(patch, dict)),
    )


def write_manifest(path: str, manifest: BuildManifest) -> None:
    """Write ``manifest`` to ``path`` atomically (a reader sees the old or the new one)."""
    temporary = path + ".tmp"
    with open(temporary, "w") as stream:
        json.dump(manifest.as_json(), stream, indent=1, sort_keys=True)
    os.replace(temporary, path)


def manifest_after_build(
    src: str,
    patches: Iterable[str],
    make_args: Iterable[str],
    before: Mapping[str, str],
    after: Mapping[str, str],
    previous: BuildManifest,
    built: Iterable[dict[str, Any]],
) -> BuildManifest:
    """The manifest of a build that just succeeded.

    ``before``/``after`` are :func:`tree_files` of ``src`` around the build: the files the
    build created or changed are its outputs (left out of later digests); the digest is
    taken over the remaining source files, so an unchanged tree matches it next time.
    """
    produced = {path for path, content in after.items() if before.get(path) != content}
    outputs = sorted(produced | set(previous.outputs))
    sources = {path: content for path, content in after.items() if path not in produced}
    return BuildManifest(
        src=os.path.realpath(src),
        digest=build_digest(sources, patches, make_args),
        outputs=tuple(outputs),
        patches=tuple(built),
    )


def built_patch_json(patch: BuiltPatch) -> dict[str, Any]:
    """A built patch as the module and the manifest report it (its store path once installed).

    ``level`` and ``stored_path`` are optional, so a built patch that was not installed
    into a store (or any object with the other fields) is reported too.
    """
    stored_path = getattr(patch, "stored_path", None)
    return {
        "build_id": patch.build_id,
        "path": stored_path or patch.path,
        "level": getattr(patch, "level", None),
        "object": patch.object,
        "functions": list(patch.functions),
        "new_functions": list(patch.new_functions),
    }
