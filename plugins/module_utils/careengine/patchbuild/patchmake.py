"""``libcare-patch-make``: build a project twice and write one patch per changed object.

Run in the project's directory (see :mod:`.project_build` for the steps)::

    libcare-patch-make [--clean] [--update] [--srcdir DIR] [--destdir VAR] [-j N]
                       [--make-arg ARG]... [--store DIR] [--sign KEY] PATCH...

``patchroot/`` gets a ``SHA256SUMS`` of its patches (signed with ``--sign``).

Progress goes to stderr: one line per stage, and the units compiled and diffed (a live
line on a terminal, a plain line every few seconds in a log); ``--quiet`` keeps only
errors. A failing build prints the end of its output (the compiler's own error); on any
failure or interrupt the tree is restored. The build system is detected (make, CMake,
Meson) or given with ``--build-system`` or ``--build-cmd``/``--install-cmd``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .buildsystems import KINDS, Wrappers
from .progress import Reporter
from .project_build import LOG_TAIL_LINES, MakeFailed, build_patches

PROG = "libcare-patch-make"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Build live patches for the project in the current directory.")
    parser.add_argument("-c", "--clean", action="store_true", help="run 'make clean' first")
    parser.add_argument("-u", "--update", action="store_true",
                        help="only redo the extraction from the last builds")
    parser.add_argument("-s", "--srcdir", help="directory to apply the patches in (default: current)")
    parser.add_argument("-d", "--destdir", default="DESTDIR", metavar="VAR",
                        help="name of the make variable for the install root (default: DESTDIR)")
    parser.add_argument("-j", "--jobs", type=int, help="parallel make jobs")
    parser.add_argument("-m", "--make-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for every make run; without a CC=... here, "
                             "CC=<this tool's directory>/libcare-cc is passed to make")
    parser.add_argument("--store", help="also install the patches into this patch store")
    parser.add_argument("--sign", metavar="KEY",
                        help="sign SHA256SUMS of patchroot/ (and of --store) with this OpenSSH private key "
                             "(ssh-keygen -Y sign, namespace libcare-livepatch) into SHA256SUMS.sig")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors and the result")
    parser.add_argument("--build-system", choices=KINDS, help="how to build (default: detected from the tree)")
    parser.add_argument("--build-cmd", default="", metavar="CMD",
                        help="shell command that builds the project (CC/CXX name the wrappers)")
    parser.add_argument("--install-cmd", default="", metavar="CMD",
                        help="shell command that installs it under $DESTDIR")
    parser.add_argument("--configure-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for CMake's or Meson's configure step")
    parser.add_argument("patches", nargs="*", metavar="PATCH", help="unified diffs (-p1)")
    return parser


def _terminate(signum: int, frame: object) -> None:
    del signum, frame
    raise KeyboardInterrupt


def with_default_compiler(make_args: list[str], tool_dir: str) -> list[str]:
    """``make_args`` plus ``CC=``/``CXX=`` naming our wrappers, unless the user set them.

    Make's command-line variables override the Makefile's, so a plain Makefile project
    builds through the wrapper without being edited or reconfigured.
    """
    result = list(make_args)
    for variable, tool in (("CC", "libcare-cc"), ("CXX", "libcare-c++")):
        wrapper = os.path.join(tool_dir, tool)
        if os.path.exists(wrapper) and not any(arg.startswith(variable + "=") for arg in make_args):
            result.append(f"{variable}={wrapper}")
    return result


def _readable(names: tuple[str, ...]) -> list[str]:
    """C++ names demangled (``_ZNK6Square4areaEv`` -> ``Square::area() const``), C names as they are."""
    if not any(name.startswith("_Z") for name in names):
        return list(names)
    from ..asm.cxx import demangle

    return demangle(list(names))


def main(argv: list[str]) -> int:
    """Entry point of ``libcare-patch-make``; returns the exit status."""
    args = _parser().parse_args(argv)
    if not args.update and not args.patches:
        _parser().error("at least one PATCH is needed (or --update)")
    tool_dir = os.path.dirname(os.path.abspath(sys.argv[0]))
    make_args = list(args.make_arg)      # make gets CC=/CXX= naming the wrappers unless given (buildsystems)
    wrappers = Wrappers.beside(tool_dir) if os.path.exists(os.path.join(tool_dir, "libcare-cc")) else None
    reporter = Reporter(PROG, quiet=args.quiet)
    # SIGTERM and SIGHUP (terminal closed) stop the run like Ctrl-C: build killed, tree restored.
    previous = {signum: signal.signal(signum, _terminate) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = build_patches(os.getcwd(), args.patches, dest=args.store, make_args=make_args,
                               jobs=args.jobs, clean=args.clean, srcdir=args.srcdir, update=args.update,
                               destdir_variable=args.destdir, progress=reporter, sign_key=args.sign,
                               build_system=args.build_system, build_command=args.build_cmd,
                               install_command=args.install_cmd, configure_args=args.configure_arg,
                               wrappers=wrappers)
    except MakeFailed as exc:
        tail = exc.output.splitlines()[-LOG_TAIL_LINES:]
        sys.stderr.write("".join(line + "\n" for line in tail))
        raise
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the sources are as they were", file=sys.stderr, flush=True)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not result.patches:
        reporter("no object changed: no patch written")
    for patch in result.patches:
        functions = ", ".join(_readable(patch.functions)) or "-"
        added = f"; adds {', '.join(_readable(patch.new_functions))}" if patch.new_functions else ""
        where = f" (stored at level {patch.level})" if patch.level is not None else ""
        print(f"{patch.path}: {os.path.relpath(patch.object)}: replaces {functions}{added}{where}")
    return 0
