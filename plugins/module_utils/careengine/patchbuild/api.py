"""The two-stage project build, as a library: what ``libcare-patch-make`` and the
``livepatch_build`` module call.

Steps (LibCare's ``libcare-patch-make``), run in the project directory:

1. ``make clean`` (only with ``clean=True``; otherwise the tree is used as it stands);
2. ``KPATCH_STAGE=original make``, then ``make install DESTDIR=<project>/lpmake``;
3. apply the patches (``patch -p1`` in the source dir; touched files are saved first);
4. ``KPATCH_STAGE=patched make`` (make's timestamps: only what the patches touch is
   rebuilt), then ``make install DESTDIR=<project>/.lpmaketmp/patched``;
5. restore the tree: saved files are put back (with a fresh mtime, so the next
   original-stage build recompiles them), files the patches created are removed;
   also when a build fails or the run is interrupted;
6. for every ELF file of the patched install with a non-empty ``.kpatch.info``: extract
   the patch against its twin in ``lpmake/`` and write ``patchroot/<build-id>.kpatch``
   (build-id of the original-stage object: what users run).

The project must compile through ``libcare-cc`` (configure it with
``CC=.../bin/libcare-cc`` or pass ``CC=...`` in ``make_args``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BuildError

ORIGINAL_DIR = "lpmake"
WORK_DIR = ".lpmaketmp"
PATCHED_DIR = os.path.join(WORK_DIR, "patched")
BACKUP_DIR = os.path.join(WORK_DIR, "backup")
PATCHROOT_DIR = "patchroot"
MAKEFILE_OVERRIDE = "lpmakefile"
LOG_TAIL_LINES = 60

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuiltPatch:
    """One patch produced for one object of the project."""

    build_id: str
    path: str                         # patchroot/<build-id>.kpatch
    object: str                       # the original-stage object in lpmake/
    functions: tuple[str, ...]        # replaced functions
    new_functions: tuple[str, ...]
    level: int | None = None          # level in the store (when installed)
    stored_path: str | None = None    # path in the store (when installed)


@dataclass(frozen=True)
class BuildResult:
    """Every patch a build produced, one per changed object."""

    patches: tuple[BuiltPatch, ...]


class MakeFailed(BuildError):
    """A make run failed; ``output`` holds what it printed (the compiler's error)."""

    def __init__(self, message: str, output: str = "", log_path: str = "") -> None:
        super().__init__(message)
        self.output = output
        self.log_path = log_path


def _no_progress(message: str) -> None:
    del message


@dataclass(frozen=True)
class ProjectBuild:
    """Where and how to build: the project dir, its source dir and make's arguments."""

    project: str
    srcdir: str
    make_args: tuple[str, ...] = ()
    jobs: int | None = None
    destdir_variable: str = "DESTDIR"
    progress: Progress = _no_progress

    def path(self, *parts: str) -> str:
        return os.path.join(self.project, *parts)

    def make(self, stage: str, targets: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
        """Run make in ``stage``; raise :class:`MakeFailed` with its output if it fails."""
        command = ["make"]
        if os.path.isfile(self.path(MAKEFILE_OVERRIDE)):
            command += ["-f", MAKEFILE_OVERRIDE]
        if self.jobs:
            command.append(f"-j{self.jobs}")
        command += list(self.make_args) + list(extra) + list(targets)
        environment = dict(os.environ, KPATCH_STAGE=stage)
        what = " ".join(["make", *targets]) if targets else "make"
        self.progress(f"stage {stage}: {what}")
        os.makedirs(self.path(WORK_DIR), exist_ok=True)
        log_path = self.path(WORK_DIR, f"{stage}-{'-'.join(targets) or 'all'}.log")
        with open(log_path, "wb") as log:
            try:
                status = subprocess.run(command, cwd=self.project, env=environment, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False).returncode
            except OSError as exc:
                raise BuildError(f"cannot run make: {exc.strerror}") from None
        if status:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                output = log.read()
            first_error = next((line.strip() for line in output.splitlines() if "error" in line.lower()), "")
            detail = f": {first_error}" if first_error else ""
            raise MakeFailed(f"{what} failed in stage {stage} (exit {status}){detail}; full log in {log_path}",
                             output=output, log_path=log_path)

    def install(self, stage: str, destination: str) -> None:
        """``make install DESTDIR=<destination>`` in ``stage`` into a fresh directory."""
        _remove_tree(destination)
        self.make(stage, ["install"], [f"{self.destdir_variable}={os.path.abspath(destination)}"])


def _remove_tree(path: str) -> None:
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


class PatchedTree:
    """Patches applied to a source dir, with everything needed to put it back.

    Each patch is checked with ``patch --dry-run`` first (so a patch that does not
    apply changes nothing); the files it will touch are saved (or noted as absent)
    before it is applied.
    """

    def __init__(self, srcdir: str, backup_dir: str) -> None:
        self.srcdir = srcdir
        self.backup_dir = backup_dir
        self.saved: dict[str, str | None] = {}   # relative path -> backup path, None = did not exist
        self.applied: list[str] = []

    def _patch(self, patch_path: str, *options: str) -> subprocess.CompletedProcess:
        command = ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-i",
                   os.path.abspath(patch_path), *options]
        try:
            return subprocess.run(command, cwd=self.srcdir, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, check=False)
        except OSError as exc:
            raise BuildError(f"cannot run patch: {exc.strerror}") from None

    def apply(self, patch_path: str) -> None:
        """Apply one patch (-p1) after saving the files it touches."""
        if not os.path.isfile(patch_path):
            raise BuildError(f"patch {patch_path} does not exist")
        dry = self._patch(patch_path, "--dry-run")
        if dry.returncode:
            message = (dry.stdout + dry.stderr).strip().replace("\n", "; ")
            raise BuildError(f"patch {patch_path} does not apply to {self.srcdir}: {message}")
        for line in dry.stdout.splitlines():
            if line.startswith("checking file "):
                self._save(_unquote(line[len("checking file "):]))
        applied = self._patch(patch_path)
        if applied.returncode:
            message = (applied.stdout + applied.stderr).strip().replace("\n", "; ")
            raise BuildError(f"patch {patch_path} failed: {message}")
        self.applied.append(patch_path)

    def _save(self, relative: str) -> None:
        if relative in self.saved:
            return
        source = os.path.join(self.srcdir, relative)
        if not os.path.lexists(source):
            self.saved[relative] = None
            return
        backup = os.path.join(self.backup_dir, f"{len(self.saved)}.orig")
        os.makedirs(self.backup_dir, exist_ok=True)
        shutil.copy2(source, backup)
        self.saved[relative] = backup

    def restore(self) -> None:
        """Put every saved file back (fresh mtime) and delete files the patches created."""
        for relative, backup in self.saved.items():
            target = os.path.join(self.srcdir, relative)
            if backup is None:
                if os.path.lexists(target):
                    os.unlink(target)
                continue
            shutil.copyfile(backup, target)
            shutil.copymode(backup, target)
            os.utime(target)
        self.saved.clear()
        self.applied.clear()
        _remove_tree(self.backup_dir)


def _unquote(name: str) -> str:
    name = name.strip()
    if name[:1] in ("'", '"'):
        try:
            return shlex.split(name)[0]
        except ValueError:
            return name.strip("'\"")
    return name


def run_stages(build: ProjectBuild, patches: Sequence[str], clean: bool = False) -> None:
    """Steps 1-5 of the module docstring: both builds and installs, tree restored."""
    if clean:
        build.progress("cleaning")
        build.make("original", ["clean"])
        for directory in (ORIGINAL_DIR, WORK_DIR, PATCHROOT_DIR):
            _remove_tree(build.path(directory))
    build.make("original")
    build.install("original", build.path(ORIGINAL_DIR))
    tree = PatchedTree(build.srcdir, build.path(BACKUP_DIR))
    try:
        for patch_path in patches:
            build.progress(f"applying {patch_path}")
            tree.apply(patch_path)
        build.make("patched")
        build.install("patched", build.path(PATCHED_DIR))
    finally:
        if tree.saved:
            build.progress("reverting the patches")
        tree.restore()


def extract_all(build: ProjectBuild) -> list[BuiltPatch]:
    """Step 6: one patch per object of the patched install that has changes."""
    from ..elf import is_elf, read_build_id
    from ..integrity import write_sums
    from ..patchfile import save_patch
    from .extract import extract_patch, has_patch_sections, has_symbol_table

    build_tree = _BuildTree(build.project)
    patched_root = build.path(PATCHED_DIR)
    original_root = build.path(ORIGINAL_DIR)
    if not os.path.isdir(patched_root) or not os.path.isdir(original_root):
        raise BuildError(f"no installed builds in {original_root} and {patched_root}: run without --update first")
    patchroot = build.path(PATCHROOT_DIR)
    os.makedirs(patchroot, exist_ok=True)
    for stale in os.listdir(patchroot):
        if stale.endswith(".kpatch"):
            os.unlink(os.path.join(patchroot, stale))
    built: dict[str, BuiltPatch] = {}
    for directory, subdirs, files in os.walk(patched_root):
        subdirs.sort()
        for name in sorted(files):
            patched = os.path.join(directory, name)
            if os.path.islink(patched) or not is_elf(patched) or not has_patch_sections(patched):
                continue
            relative = os.path.relpath(patched, patched_root)
            original = os.path.join(original_root, relative)
            if not os.path.isfile(original):
                raise BuildError(f"{relative} has changes but no original-stage twin in {original_root}")
            build_id = read_build_id(original)
            if not build_id:
                raise BuildError(f"{original} has no GNU build-id")
            if build_id in built:
                continue
            build.progress(f"extracting the patch for {relative} (build-id {build_id})")
            if not has_symbol_table(patched):
                patched = build_tree.unstripped(patched)
            patch, extracted = extract_patch(patched, original, build_id)
            path = os.path.join(patchroot, f"{build_id}.kpatch")
            save_patch(patch, path)
            if not extracted.functions:
                build.progress(f"warning: the patch for {relative} replaces no function, it only adds new ones "
                               "(was the tree built without libcare-cc before? then use --clean)")
            built[build_id] = BuiltPatch(build_id, path, original, extracted.functions, extracted.new_functions)
    write_sums(patchroot)
    return list(built.values())


class _BuildTree:
    """The project's own build outputs by build-id, for installs that strip (``install -s``).

    A stripped install lost ``.symtab`` and the relocations kept by ``-Wl,-q``; the
    unstripped file with the same build-id is still in the build tree.
    """

    def __init__(self, project: str) -> None:
        self.project = project
        self._by_build_id: dict[str, str] | None = None

    def _index(self) -> dict[str, str]:
        from ..elf import ElfError, is_elf, read_build_id
        from .extract import has_symbol_table

        found: dict[str, str] = {}
        skipped = {ORIGINAL_DIR, WORK_DIR, PATCHROOT_DIR}
        for directory, subdirs, files in os.walk(self.project):
            if directory == self.project:
                subdirs[:] = [d for d in subdirs if d not in skipped]
            subdirs.sort()
            for name in sorted(files):
                path = os.path.join(directory, name)
                if os.path.islink(path) or not is_elf(path):
                    continue
                try:
                    build_id = read_build_id(path)
                    if build_id and build_id not in found and has_symbol_table(path):
                        found[build_id] = path
                except ElfError:
                    continue
        return found

    def unstripped(self, installed: str) -> str:
        """The build-tree file with the build-id of ``installed`` (which was stripped)."""
        from ..elf import read_build_id

        if self._by_build_id is None:
            self._by_build_id = self._index()
        build_id = read_build_id(installed)
        twin = self._by_build_id.get(build_id or "")
        if twin is None:
            raise BuildError(f"{installed} was stripped on install and the build tree has no unstripped copy "
                             f"(build-id {build_id}): install unstripped binaries")
        return twin


def install_into_store(built: BuiltPatch, store_root: str) -> BuiltPatch:
    """Store a built patch at 1 + the highest level (or at the level holding the same patch)."""
    from dataclasses import replace

    from ..patchfile import load_patch
    from ..storage import PATCH_FILENAME, PatchStore

    store = PatchStore(store_root)
    patch = load_patch(built.path)
    levels = store.levels(built.build_id)
    level = None
    for existing in levels:
        stored = load_patch(os.path.join(store_root, built.build_id, str(existing), PATCH_FILENAME))
        if stored.elf_image == patch.elf_image:
            level = existing
            break
    if level is None:
        level = (max(levels) if levels else 0) + 1
    stored_path = store.install(patch, level)
    return replace(built, level=level, stored_path=stored_path)


def build_patches(src: str, patches: list[str], dest: str | None = None, make_args: Sequence[str] = (),
                  jobs: int | None = None, clean: bool = False, *, srcdir: str | None = None,
                  update: bool = False, destdir_variable: str = "DESTDIR",
                  progress: Progress | None = None, sign_key: str | None = None) -> BuildResult:
    """Build the project at ``src`` twice (original, patched) and extract its patches.

    ``patches`` are unified diffs applied with ``patch -p1`` in ``srcdir`` (default
    ``src``); ``make_args`` go to every make run (e.g. ``CC=/path/bin/libcare-cc``).
    With ``dest``, every patch is also installed in the patch store ``dest``.
    With ``update``, the builds are skipped and only extraction is redone.
    ``patchroot/`` (and the store) get a ``SHA256SUMS``; with ``sign_key`` (an OpenSSH
    private key) it is signed into ``SHA256SUMS.sig``.
    """
    project = os.path.abspath(src)
    if not os.path.isdir(project):
        raise BuildError(f"project directory {src} does not exist")
    absolute_patches = [os.path.abspath(p) for p in patches]
    build = ProjectBuild(project, os.path.abspath(srcdir or src), tuple(make_args), jobs,
                         destdir_variable, progress or _no_progress)
    if not update:
        if not absolute_patches:
            raise BuildError("no patches given")
        run_stages(build, absolute_patches, clean=clean)
    built = extract_all(build)
    if dest is not None:
        built = [install_into_store(patch, dest) for patch in built]
    if sign_key:
        from ..integrity import sign_sums

        for directory in [build.path(PATCHROOT_DIR)] + ([dest] if dest is not None else []):
            if os.path.isfile(os.path.join(directory, "SHA256SUMS")):
                sign_sums(directory, sign_key)
                build.progress(f"signed {directory}/SHA256SUMS with {sign_key}")
    return BuildResult(tuple(built))
