"""The project's build system: which commands configure, build, install and clean it.

:func:`detect` picks one from the tree (``lpmakefile``/``Makefile`` -> make,
``CMakeLists.txt`` -> CMake, ``meson.build`` -> Meson), or the user names the commands
(:class:`CustomCommands`). Each turns a stage into argv lists; :mod:`.project_build` runs them.

* **make**: ``make [-f lpmakefile] [-jN] ARGS`` and ``make install VAR=<root>``; make's
  command-line ``CC=``/``CXX=`` name the wrappers.
* **CMake**: configured once (stage ``configure``: every compiler probe passes through)
  in a build dir with ``CMAKE_C_COMPILER``/``CMAKE_CXX_COMPILER`` = the wrappers and its
  default generator (Ninja when installed); ``cmake --build`` and
  ``cmake --install --prefix`` with ``DESTDIR``.
* **Meson**: ``meson setup`` with a native file naming the wrappers, ``meson compile``
  and ``meson install --destdir``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import BuildError

MAKEFILE_OVERRIDE = "lpmakefile"
MAKEFILES = (MAKEFILE_OVERRIDE, "GNUmakefile", "makefile", "Makefile")
KINDS = ("make", "cmake", "meson")


@dataclass(frozen=True)
class Wrappers:
    """Paths of ``libcare-cc`` and ``libcare-c++``."""

    cc: str
    cxx: str

    @classmethod
    def beside(cls, directory: str) -> Wrappers:
        return cls(os.path.join(directory, "libcare-cc"), os.path.join(directory, "libcare-c++"))


@dataclass(frozen=True)
class Step:
    """One command of a stage: how progress names it, argv (or a shell line), where, extra environment."""

    title: str
    argv: tuple[str, ...]
    cwd: str
    environment: tuple[tuple[str, str], ...] = ()
    shell: bool = False


@dataclass(frozen=True)
class BuildSystem:
    """Base: a project dir, a build dir, the wrappers and the user's extra arguments."""

    project: str
    build_dir: str
    wrappers: Wrappers
    jobs: int | None = None
    extra_args: tuple[str, ...] = ()
    configure_args: tuple[str, ...] = ()
    name: str = field(default="", init=False)

    def configure(self) -> list[Step]:
        """Commands run once, before the original build (stage ``configure``)."""
        return []

    def needs_configure(self) -> bool:
        return False

    def build(self) -> Step:
        raise NotImplementedError

    def install(self, destination: str) -> Step:
        raise NotImplementedError

    def clean(self) -> Step | None:
        return None

    def scratch_dirs(self) -> tuple[str, ...]:
        """Directories of ours inside the project (never searched for build outputs)."""
        return ()


@dataclass(frozen=True)
class MakeBuild(BuildSystem):
    """GNU make in the project dir (``lpmakefile`` preferred, as in LibCare)."""

    destdir_variable: str = "DESTDIR"
    name: str = field(default="make", init=False)

    def _make(self, *targets: str) -> list[str]:
        command = ["make"]
        if os.path.isfile(os.path.join(self.project, MAKEFILE_OVERRIDE)):
            command += ["-f", MAKEFILE_OVERRIDE]
        if self.jobs:
            command.append(f"-j{self.jobs}")
        return command + with_default_compiler(list(self.extra_args), self.wrappers) + list(targets)

    def build(self) -> Step:
        return Step("make", tuple(self._make()), self.project)

    def install(self, destination: str) -> Step:
        return Step("make install",
                    tuple(self._make("install", f"{self.destdir_variable}={os.path.abspath(destination)}")),
                    self.project)

    def clean(self) -> Step:
        return Step("make clean", tuple(self._make("clean")), self.project)


def with_default_compiler(make_args: list[str], wrappers: Wrappers) -> list[str]:
    """``make_args`` plus ``CC=``/``CXX=`` naming our wrappers, unless the user set them.

    Make's command-line variables override the Makefile's, so a plain Makefile project
    builds through the wrapper without being edited or reconfigured.
    """
    result = list(make_args)
    for variable, wrapper in (("CC", wrappers.cc), ("CXX", wrappers.cxx)):
        if os.path.exists(wrapper) and not any(arg.startswith(variable + "=") for arg in make_args):
            result.append(f"{variable}={wrapper}")
    return result


@dataclass(frozen=True)
class CMakeBuild(BuildSystem):
    """CMake: configured once in ``build_dir`` with the wrappers as compilers."""

    name: str = field(default="cmake", init=False)

    def needs_configure(self) -> bool:
        return not os.path.isfile(os.path.join(self.build_dir, "CMakeCache.txt"))

    def configure(self) -> list[Step]:
        argv = ["cmake", "-S", self.project, "-B", self.build_dir,
                f"-DCMAKE_C_COMPILER={self.wrappers.cc}", f"-DCMAKE_CXX_COMPILER={self.wrappers.cxx}"]
        if shutil.which("ninja") and not any(arg.startswith("-G") for arg in self.configure_args):
            argv += ["-G", "Ninja"]
        if not any(arg.startswith("-DCMAKE_BUILD_TYPE") for arg in self.configure_args):
            argv.append("-DCMAKE_BUILD_TYPE=RelWithDebInfo")
        return [Step("cmake configure", tuple(argv + list(self.configure_args)), self.project)]

    def build(self) -> Step:
        jobs = ["--parallel", str(self.jobs)] if self.jobs else []
        return Step("cmake --build", ("cmake", "--build", self.build_dir, *jobs, *self.extra_args), self.project)

    def install(self, destination: str) -> Step:
        return Step("cmake --install", ("cmake", "--install", self.build_dir), self.project,
                    (("DESTDIR", os.path.abspath(destination)),))

    def clean(self) -> Step:
        return Step("cmake clean", ("cmake", "--build", self.build_dir, "--target", "clean"), self.project)

    def scratch_dirs(self) -> tuple[str, ...]:
        return (self.build_dir,)


@dataclass(frozen=True)
class MesonBuild(BuildSystem):
    """Meson/Ninja: ``meson setup`` with a native file naming the wrappers."""

    name: str = field(default="meson", init=False)

    @property
    def native_file(self) -> str:
        return self.build_dir + ".native.ini"

    def needs_configure(self) -> bool:
        return not os.path.isfile(os.path.join(self.build_dir, "build.ninja"))

    def configure(self) -> list[Step]:
        os.makedirs(os.path.dirname(self.native_file), exist_ok=True)
        with open(self.native_file, "w", encoding="utf-8") as stream:
            stream.write(f"[binaries]\nc = '{self.wrappers.cc}'\ncpp = '{self.wrappers.cxx}'\n")
        argv = ["meson", "setup", "--native-file", self.native_file, *self.configure_args,
                self.build_dir, self.project]
        return [Step("meson setup", tuple(argv), self.project)]

    def build(self) -> Step:
        jobs = ["-j", str(self.jobs)] if self.jobs else []
        return Step("meson compile", ("meson", "compile", "-C", self.build_dir, *jobs, *self.extra_args),
                    self.project)

    def install(self, destination: str) -> Step:
        return Step("meson install", ("meson", "install", "-C", self.build_dir, "--no-rebuild", "--destdir",
                                      os.path.abspath(destination)), self.project)

    def clean(self) -> Step:
        return Step("meson clean", ("meson", "compile", "-C", self.build_dir, "--clean"), self.project)

    def scratch_dirs(self) -> tuple[str, ...]:
        return (self.build_dir,)


@dataclass(frozen=True)
class CustomCommands(BuildSystem):
    """Shell commands given by the user; ``DESTDIR`` names the install root, ``CC``/``CXX`` the wrappers,
    and ``-j N`` reaches the make or CMake the commands run (``MAKEFLAGS``, ``CMAKE_BUILD_PARALLEL_LEVEL``)."""

    build_command: str = ""
    install_command: str = ""
    clean_command: str = ""
    name: str = field(default="command", init=False)

    def _environment(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        compilers = tuple((variable, path) for variable, path in (("CC", self.wrappers.cc), ("CXX", self.wrappers.cxx))
                          if variable not in os.environ)
        return compilers + self._parallel() + extra

    def _parallel(self) -> tuple[tuple[str, str], ...]:
        """``-j N`` as the variables make and ``cmake --build`` read (added to the caller's MAKEFLAGS)."""
        if not self.jobs:
            return ()
        makeflags = f"{os.environ.get('MAKEFLAGS', '')} -j{self.jobs}".strip()
        return (("MAKEFLAGS", makeflags), ("CMAKE_BUILD_PARALLEL_LEVEL", str(self.jobs)))

    def build(self) -> Step:
        return Step("build command", (self.build_command,), self.project, self._environment(), shell=True)

    def install(self, destination: str) -> Step:
        return Step("install command", (self.install_command,), self.project,
                    self._environment(("DESTDIR", os.path.abspath(destination))), shell=True)

    def clean(self) -> Step | None:
        if not self.clean_command:
            return None
        return Step("clean command", (self.clean_command,), self.project, self._environment(), shell=True)


def detect(project: str) -> str:
    """The build system of ``project``: ``make``, ``cmake`` or ``meson``."""
    if any(os.path.isfile(os.path.join(project, name)) for name in MAKEFILES):
        return "make"
    if os.path.isfile(os.path.join(project, "CMakeLists.txt")):
        return "cmake"
    if os.path.isfile(os.path.join(project, "meson.build")):
        return "meson"
    raise BuildError(f"{project} has no Makefile, CMakeLists.txt or meson.build: "
                     "give the commands with --build-cmd and --install-cmd")


def choose(project: str, build_dir: str, wrappers: Wrappers, *, kind: str | None = None,
           jobs: int | None = None, extra_args: Sequence[str] = (), configure_args: Sequence[str] = (),
           destdir_variable: str = "DESTDIR", build_command: str = "", install_command: str = "",
           clean_command: str = "") -> BuildSystem:
    """The build system to drive: the user's commands, ``kind``, or the one detected."""
    if build_command or install_command:
        if not (build_command and install_command):
            raise BuildError("--build-cmd and --install-cmd go together")
        return CustomCommands(project, build_dir, wrappers, jobs, tuple(extra_args), tuple(configure_args),
                              build_command=build_command, install_command=install_command,
                              clean_command=clean_command)
    kind = kind or detect(project)
    common = (project, build_dir, wrappers, jobs, tuple(extra_args), tuple(configure_args))
    if kind == "make":
        return MakeBuild(*common, destdir_variable=destdir_variable)
    if kind == "cmake":
        _require("cmake")
        return CMakeBuild(*common)
    if kind == "meson":
        _require("meson")
        return MesonBuild(*common)
    raise BuildError(f"unknown build system {kind!r} (one of {', '.join(KINDS)})")


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise BuildError(f"{tool} is not installed (apt-get install {tool})")
