"""The two-stage project build, as a library: what ``libcare-patch-make`` and the
``livepatch_build`` module call.

Steps (LibCare's ``libcare-patch-make``), run in the project directory:

0. finish the restore of a run that was killed while the tree was patched
   (:func:`.sourcetree.recover`), then check that every patch applies, in order, on a
   scratch copy (:func:`.sourcetree.check_patches`): nothing is built for a bad patch;
1. clean (only with ``clean=True``; otherwise the tree is used as it stands);
2. configure when the build system needs it (CMake, Meson: stage ``configure``), then
   ``KPATCH_STAGE=original`` build and install into ``$LPMAKE_ORIGINAL_DIR``
   (default ``<project>/lpmake``);
3. apply the patches (``patch -p1`` in the source dir; the originals of touched files
   are kept outside the tree, see :mod:`.sourcetree`);
4. ``KPATCH_STAGE=patched`` build (timestamps: only what the patches touch is
   rebuilt) and install into ``$LPMAKE_PATCHED_DIR`` (default ``.lpmaketmp/patched``);
5. restore the tree byte for byte (fresh mtime, so the next original-stage build
   recompiles the files), also when a build fails, crashes or is interrupted;
6. for every ELF file of the patched install with a non-empty ``.kpatch.info``: extract
   the patch against its original-stage twin and write ``$LPMAKE_PATCHROOT/<build-id>.kpatch``
   (default ``patchroot``; build-id of the original-stage object: what users run).

Every build command runs with ``KPATCH_STAGE``, ``IS_LIBCARE_CC=y`` (LibCare's test
makefiles rely on it) and ``LPMAKE_PROGRESS_FILE`` (units compiled, for progress) in
its environment, in its own process group (killed as a whole on an interrupt). Which
commands build and install the project: :mod:`.buildsystems`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import BuildError
from . import buildsystems, sourcetree
from .progress import PROGRESS_ENV, Reporter, UnitCounter, UnitCounts

ORIGINAL_DIR = "lpmake"
WORK_DIR = ".lpmaketmp"
PATCHED_DIR = os.path.join(WORK_DIR, "patched")
BUILD_DIR = os.path.join(WORK_DIR, "build")
PATCHROOT_DIR = "patchroot"
MAKEFILE_OVERRIDE = buildsystems.MAKEFILE_OVERRIDE
LOG_TAIL_LINES = 60
POLL_SECONDS = 0.5
KILL_GRACE_SECONDS = 5.0

Progress = Callable[[str], None]
Ticker = Callable[[str, UnitCounts, float, "int | None"], None]


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
    """A build command failed; ``output`` holds what it printed (the compiler's error)."""

    def __init__(self, message: str, output: str = "", log_path: str = "") -> None:
        super().__init__(message)
        self.output = output
        self.log_path = log_path


def _no_progress(message: str) -> None:
    del message


def _no_tick(what: str, counts: UnitCounts, elapsed: float, total: int | None) -> None:
    del what, counts, elapsed, total


def output_dir(project: str, variable: str, default: str) -> str:
    """``$variable`` (LibCare's ``LPMAKE_*``; relative to the project) or ``<project>/<default>``."""
    return os.path.join(project, os.environ.get(variable) or default)


def default_wrappers() -> buildsystems.Wrappers:
    """``libcare-cc``/``libcare-c++`` of this checkout's (or collection's) ``bin/``."""
    here = os.path.dirname(os.path.abspath(__file__))
    return buildsystems.Wrappers.beside(os.path.normpath(os.path.join(here, "..", "..", "..", "..", "bin")))


@dataclass(frozen=True)
class ProjectBuild:
    """Where and how to build: the project dir, its source dir and its build system."""

    project: str
    srcdir: str
    make_args: tuple[str, ...] = ()
    jobs: int | None = None
    destdir_variable: str = "DESTDIR"
    progress: Progress = _no_progress
    system: buildsystems.BuildSystem | None = None
    tick: Ticker = _no_tick
    original_dir: str = ""
    patched_dir: str = ""
    patchroot: str = ""
    _system: buildsystems.BuildSystem = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        system = self.system or buildsystems.MakeBuild(
            self.project, self.path(BUILD_DIR), default_wrappers(), self.jobs, self.make_args,
            destdir_variable=self.destdir_variable)
        object.__setattr__(self, "_system", system)
        for name, variable, default in (("original_dir", "LPMAKE_ORIGINAL_DIR", ORIGINAL_DIR),
                                        ("patched_dir", "LPMAKE_PATCHED_DIR", PATCHED_DIR),
                                        ("patchroot", "LPMAKE_PATCHROOT", PATCHROOT_DIR)):
            if not getattr(self, name):
                object.__setattr__(self, name, output_dir(self.project, variable, default))
            _refuse_holding_the_project(getattr(self, name), variable, (self.project, self.srcdir))

    @property
    def build_system(self) -> buildsystems.BuildSystem:
        return self._system

    def path(self, *parts: str) -> str:
        return os.path.join(self.project, *parts)

    def output_dirs(self) -> tuple[str, ...]:
        """Our output directories (inside the project unless ``LPMAKE_*`` put them elsewhere): never
        searched for the project's own build outputs."""
        return (self.original_dir, self.patched_dir, self.patchroot)

    def make(self, stage: str, targets: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
        """Run the build (no ``targets``), ``install`` or ``clean`` in ``stage``."""
        if list(targets) == ["install"]:
            destination = next((a.split("=", 1)[1] for a in extra if a.startswith(self.destdir_variable + "=")), "")
            self.run(self._system.install(destination), stage, "install")
        elif list(targets) == ["clean"]:
            step = self._system.clean()
            if step is not None:
                self.run(step, stage, "clean")
        else:
            self.run(self._system.build(), stage, "all")

    def install(self, stage: str, destination: str) -> None:
        """Install the ``stage`` build into a fresh ``destination``."""
        _remove_tree(destination)
        self.run(self._system.install(destination), stage, "install")

    def run(self, step: buildsystems.Step, stage: str, log_name: str) -> None:
        """Run one build command; raise :class:`MakeFailed` with its output if it fails."""
        what = step.title
        self.progress(f"stage {stage}: {what}")
        work = self.path(WORK_DIR)
        os.makedirs(work, exist_ok=True)
        log_path = os.path.join(work, f"{stage}-{log_name}.log")
        counts_path = os.path.join(work, f"units-{stage}")
        total = _read_count(counts_path) if stage == "original" else None
        progress_path = os.path.join(work, f"progress-{stage}-{log_name}")
        if os.path.lexists(progress_path):
            os.unlink(progress_path)
        environment = dict(os.environ, KPATCH_STAGE=stage, IS_LIBCARE_CC="y")
        environment[PROGRESS_ENV] = progress_path
        environment.update(step.environment)
        started = time.monotonic()
        counter = UnitCounter(progress_path)
        with open(log_path, "w+b") as log:
            status = _run_in_group(step, environment, log,
                                   lambda: self.tick(what, counter.read(), time.monotonic() - started, total))
            log.seek(0)
            output = log.read().decode("utf-8", errors="replace")
        counts = counter.read()
        self.tick(what, counts, time.monotonic() - started, total)
        if hasattr(self.progress, "done"):
            self.progress.done(what, counts, time.monotonic() - started, total)
        if counts.unchecked_layouts:
            self.progress(_unchecked_layouts_warning(counts.unchecked_layouts))
        if status:
            first_error = next((line.strip() for line in output.splitlines() if "error" in line.lower()), "")
            detail = f": {first_error}" if first_error else ""
            raise MakeFailed(f"{what} failed in stage {stage} (exit {status}){detail}; full log in {log_path}",
                             output=output, log_path=log_path)
        if stage == "original" and log_name == "all" and counts.compiled and os.path.isdir(work):
            with open(counts_path, "w", encoding="utf-8") as stream:
                stream.write(f"{counts.compiled}\n")


def _unchecked_layouts_warning(units: Sequence[str]) -> str:
    """The one line saying which changed units could not have their type layouts compared."""
    shown = ", ".join(units[:5]) + (f" and {len(units) - 5} more" if len(units) > 5 else "")
    return (f"warning: {len(units)} changed unit{'s' if len(units) != 1 else ''} built without debug information "
            f"(-g): struct and class layouts not checked ({shown})")


def _refuse_holding_the_project(directory: str, variable: str, protected: Sequence[str]) -> None:
    """Output dirs are emptied before use: never ``/``, the project, or a directory holding it."""
    real = os.path.realpath(directory)
    for path in protected:
        held = os.path.realpath(path)
        if real == "/" or held == real or held.startswith(real.rstrip("/") + "/"):
            raise BuildError(f"{variable}={directory} would be emptied before use and it holds {path}: "
                             "give it a directory of its own")


def _read_count(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as stream:
            return int(stream.read().strip())
    except (OSError, ValueError):
        return None


def _run_in_group(step: buildsystems.Step, environment: dict[str, str], log, poll: Callable[[], None]) -> int:
    """Run ``step`` in its own process group, logging to ``log``; kill the group if we are interrupted.

    Its own group: a Ctrl-C on the terminal reaches only us, and we stop the whole build
    (make, its compilers) before the tree is restored, so nothing writes to it afterwards.
    """
    command = step.argv[0] if step.shell else list(step.argv)
    try:
        process = subprocess.Popen(command, cwd=step.cwd, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, shell=step.shell, process_group=0)
    except OSError as exc:
        raise BuildError(f"cannot run {step.title}: {exc.strerror}") from None
    try:
        while True:
            try:
                return process.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                poll()
    except BaseException:
        _kill_group(process)
        raise


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the build's process group, SIGKILL after a grace period; reap the leader."""
    for kill_signal in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, kill_signal)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            continue
        if kill_signal == signal.SIGTERM:
            try:
                os.killpg(process.pid, signal.SIGKILL)   # children that outlived the leader
            except ProcessLookupError:
                pass
        break


def _remove_tree(path: str) -> None:
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


PatchedTree = sourcetree.PatchedTree


def run_stages(build: ProjectBuild, patches: Sequence[str], clean: bool = False) -> None:
    """Steps 0-5 of the module docstring: both builds and installs, tree restored (one run per tree)."""
    state_dir = sourcetree.state_dir_for(build.srcdir)
    with sourcetree.exclusive(build.srcdir, state_dir):
        _run_stages(build, patches, clean, state_dir)


def _run_stages(build: ProjectBuild, patches: Sequence[str], clean: bool, state_dir: str) -> None:
    if sourcetree.recover(build.srcdir, state_dir):
        build.progress(f"restored {build.srcdir}: a previous run was killed while it was patched")
    build.progress("checking the patches")
    sourcetree.check_patches(build.srcdir, patches)
    system = build.build_system
    if clean:
        build.progress("cleaning")
        if system.scratch_dirs():
            for directory in system.scratch_dirs():
                _remove_tree(directory)
        else:
            build.make("original", ["clean"])
        for directory in (build.original_dir, build.path(WORK_DIR), build.patchroot):
            _remove_tree(directory)
    if system.needs_configure():
        for step in system.configure():
            build.run(step, "configure", "configure")
    build.make("original")
    build.install("original", build.original_dir)
    tree = PatchedTree(build.srcdir, state_dir)
    try:
        for patch_path in patches:
            build.progress(f"applying {patch_path}")
            tree.apply(patch_path)
        build.make("patched")
        build.install("patched", build.patched_dir)
    finally:
        try:
            if tree.saved:
                build.progress("reverting the patches")   # may fail (a closed terminal): restore anyway
        finally:
            tree.restore()


def extract_all(build: ProjectBuild) -> list[BuiltPatch]:
    """Step 6: one patch per object of the patched install that has changes."""
    from ..integrity import write_sums

    if not os.path.isdir(build.patched_dir) or not os.path.isdir(build.original_dir):
        raise BuildError(f"no installed builds in {build.original_dir} and {build.patched_dir}: "
                         "run without --update first")
    _clear_patchroot(build.patchroot)
    build_tree = _BuildTree(build.project, build.output_dirs())
    built: dict[str, BuiltPatch] = {}
    for relative in _changed_objects(build.patched_dir):
        original, build_id = _original_twin(build.original_dir, relative)
        if build_id not in built:
            built[build_id] = _extract_one(build, build_tree, relative, original, build_id)
    write_sums(build.patchroot)
    return list(built.values())


def _clear_patchroot(patchroot: str) -> None:
    """Create ``patchroot``, without the patches of an earlier run."""
    os.makedirs(patchroot, exist_ok=True)
    for stale in os.listdir(patchroot):
        if stale.endswith(".kpatch"):
            os.unlink(os.path.join(patchroot, stale))


def _changed_objects(patched_root: str) -> Iterator[str]:
    """Relative paths of the ELF files in the patched install that carry patch sections, sorted."""
    from ..elf import is_elf
    from .extract import has_patch_sections

    for directory, subdirs, files in os.walk(patched_root):
        subdirs.sort()
        for name in sorted(files):
            patched = os.path.join(directory, name)
            if os.path.islink(patched) or not is_elf(patched) or not has_patch_sections(patched):
                continue
            yield os.path.relpath(patched, patched_root)


def _original_twin(original_root: str, relative: str) -> tuple[str, str]:
    """The original-stage file of a changed object and its build-id (the patch's target)."""
    from ..elf import read_build_id

    original = os.path.join(original_root, relative)
    if not os.path.isfile(original):
        raise BuildError(f"{relative} has changes but no original-stage twin in {original_root}")
    build_id = read_build_id(original)
    if not build_id:
        raise BuildError(f"{original} has no GNU build-id")
    return original, build_id


def _extract_one(build: ProjectBuild, build_tree: _BuildTree, relative: str, original: str,
                 build_id: str) -> BuiltPatch:
    """Extract and save the patch of one changed object (from its unstripped twin if stripped)."""
    from ..patchfile import save_patch
    from .extract import extract_patch, has_symbol_table

    build.progress(f"extracting the patch for {relative} (build-id {build_id})")
    patched = os.path.join(build.patched_dir, relative)
    if not has_symbol_table(patched):
        patched = build_tree.unstripped(patched)
    patch, extracted = extract_patch(patched, original, build_id)
    path = os.path.join(build.patchroot, f"{build_id}.kpatch")
    save_patch(patch, path)
    if not extracted.functions:
        build.progress(f"warning: the patch for {relative} replaces no function, it only adds new ones "
                       "(was the tree built without libcare-cc before? then use --clean)")
    return BuiltPatch(build_id, path, original, extracted.functions, extracted.new_functions)


class _BuildTree:
    """The project's own build outputs by build-id, for installs that strip (``install -s``).

    A stripped install lost ``.symtab`` and the relocations kept by ``-Wl,-q``; the
    unstripped file with the same build-id is still in the build tree.
    """

    def __init__(self, project: str, skipped: Sequence[str] = ()) -> None:
        self.project = project
        self.skipped = {os.path.abspath(path) for path in skipped}
        self._by_build_id: dict[str, str] | None = None

    def _index(self) -> dict[str, str]:
        from ..elf import ElfError, is_elf, read_build_id
        from .extract import has_symbol_table

        found: dict[str, str] = {}
        for directory, subdirs, files in os.walk(self.project):
            subdirs[:] = [d for d in subdirs if os.path.join(directory, d) not in self.skipped]
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
                  progress: Progress | None = None, sign_key: str | None = None,
                  build_system: str | None = None, build_command: str = "", install_command: str = "",
                  configure_args: Sequence[str] = (), wrappers: buildsystems.Wrappers | None = None) -> BuildResult:
    """Build the project at ``src`` twice (original, patched) and extract its patches.

    ``patches`` are unified diffs applied with ``patch -p1`` in ``srcdir`` (default
    ``src``); ``make_args`` go to every make run (e.g. ``CC=/path/bin/libcare-cc``).
    With ``dest``, every patch is also installed in the patch store ``dest``.
    With ``update``, the builds are skipped and only extraction is redone.
    ``build_system`` (``make``, ``cmake``, ``meson``; default: detected from the tree) or
    ``build_command``/``install_command`` (shell lines; ``DESTDIR`` names the install
    root) say how the project is built (:mod:`.buildsystems`); ``configure_args`` go to
    CMake's or Meson's configure step; ``wrappers`` default to this checkout's ``bin/``.
    ``progress`` gets stage messages; when it is a :class:`.progress.Reporter`, it also
    gets the live unit counts.
    ``patchroot/`` (and the store) get a ``SHA256SUMS``; with ``sign_key`` (an OpenSSH
    private key) it is signed into ``SHA256SUMS.sig``.
    """
    project = os.path.abspath(src)
    if not os.path.isdir(project):
        raise BuildError(f"project directory {src} does not exist")
    absolute_patches = [os.path.abspath(p) for p in patches]
    system = buildsystems.choose(project, os.path.join(project, BUILD_DIR), wrappers or default_wrappers(),
                                 kind=build_system, jobs=jobs, extra_args=make_args, configure_args=configure_args,
                                 destdir_variable=destdir_variable, build_command=build_command,
                                 install_command=install_command)
    tick = progress.tick if isinstance(progress, Reporter) else _no_tick
    build = ProjectBuild(project, os.path.abspath(srcdir or src), tuple(make_args), jobs,
                         destdir_variable, progress or _no_progress, system, tick)
    if not update:
        if not absolute_patches:
            raise BuildError("no patches given")
        run_stages(build, absolute_patches, clean=clean)
    built = extract_all(build)
    if dest is not None:
        built = [install_into_store(patch, dest) for patch in built]
    if sign_key:
        from ..integrity import sign_sums

        for directory in [build.patchroot] + ([dest] if dest is not None else []):
            if os.path.isfile(os.path.join(directory, "SHA256SUMS")):
                sign_sums(directory, sign_key)
                build.progress(f"signed {directory}/SHA256SUMS with {sign_key}")
    return BuildResult(tuple(built))
