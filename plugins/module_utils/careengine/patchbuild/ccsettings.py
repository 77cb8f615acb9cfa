"""LibCare's ``KPCC_*`` settings of the compiler wrapper, read from the environment.

``KPCC_REMOVE_ARGS``
    ``;``-separated arguments dropped from every compile and link the wrapper handles
    (exact match, as LibCare). LibCare's default is ``-g``; ours is nothing: dropping
    ``-g`` changes the binaries (and their build-id) users run, and our diff ignores
    debug information anyway.
``KPCC_APPEND_ARGS``
    ``;``-separated arguments appended to those invocations.
``KPCC_DBGFILTER_ARGS``
    options of LibCare's debug-filter pass. Our parser always drops debug info,
    ``.eh_frame`` and ``.gcc_except_table`` before comparing, which is what LibCare's
    default list asks; those options (and ``--os=``, ``--arch=x86_64``) are accepted,
    anything else is refused rather than silently ignored.
``KPCC_PATCH_ARGS``
    options of LibCare's compare pass: ``--force-gotpcrel`` (always done by ours),
    ``--os=``, ``--arch=x86_64`` and ``--ignore-changes=[FILE:]FUNC,...`` (those
    functions keep their original code); anything else is refused.
``KPCC_DEBUG``
    a number; 1 or more prints the settings and every command run to stderr, 2 also
    the wrapper's own command line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import BuildError

DBGFILTER_OPTIONS = frozenset({"--dbg-filter", "--dbg-filter-eh-frame", "--dbg-filter-gcc-except-table"})
PATCH_OPTIONS = frozenset({"--force-gotpcrel"})
ACCEPTED_PREFIXES = ("--os=", "--arch=x86_64")
IGNORE_CHANGES = "--ignore-changes="


def split_list(value: str) -> list[str]:
    """``a;b;;c`` -> ``[a, b, c]`` (LibCare's separator)."""
    return [item for item in value.split(";") if item]


@dataclass(frozen=True)
class WrapperSettings:
    """What the ``KPCC_*`` variables ask of one wrapper run."""

    remove_args: frozenset[str] = frozenset()
    append_args: tuple[str, ...] = ()
    ignore_changes: tuple[str, ...] = ()     # [file:]function
    debug: int = 0

    def modify(self, argv: list[str]) -> list[str]:
        """``argv`` without the removed options, with the appended ones (LibCare's order)."""
        kept = [arg for arg in argv if not (arg.startswith("-") and len(arg) > 1 and arg in self.remove_args)]
        return kept + list(self.append_args)

    def ignored_functions(self, source: str) -> tuple[str, ...]:
        """The functions of ``source`` whose changes are ignored."""
        base = os.path.basename(source)
        names = []
        for entry in self.ignore_changes:
            where, _, function = entry.rpartition(":")
            if not where or os.path.basename(where) == base:
                names.append(function)
        return tuple(names)

    def trace(self, message: str) -> None:
        """One debug line on stderr when ``KPCC_DEBUG`` is set."""
        if self.debug:
            print(f"libcare-cc: {message}", file=sys.stderr, flush=True)


def _checked(variable: str, options: list[str], known: frozenset[str]) -> list[str]:
    ignore: list[str] = []
    for option in options:
        if option.startswith(IGNORE_CHANGES) and variable == "KPCC_PATCH_ARGS":
            ignore += [name for name in option[len(IGNORE_CHANGES):].split(",") if name]
        elif option not in known and not option.startswith(ACCEPTED_PREFIXES):
            raise BuildError(f"{variable}: option {option!r} is not supported by this libcare-cc "
                             f"(supported: {', '.join(sorted(known))}, --os=, --arch=x86_64"
                             f"{', --ignore-changes=' if variable == 'KPCC_PATCH_ARGS' else ''})")
    return ignore


def from_environment(environment: Mapping[str, str] | None = None) -> WrapperSettings:
    """Read and check the ``KPCC_*`` variables; :class:`BuildError` for an unsupported option."""
    environment = os.environ if environment is None else environment
    _checked("KPCC_DBGFILTER_ARGS", split_list(environment.get("KPCC_DBGFILTER_ARGS", "")), DBGFILTER_OPTIONS)
    ignore = _checked("KPCC_PATCH_ARGS", split_list(environment.get("KPCC_PATCH_ARGS", "")), PATCH_OPTIONS)
    debug_text = environment.get("KPCC_DEBUG", "").strip()
    try:
        debug = int(debug_text) if debug_text else 0
    except ValueError:
        debug = 1
    return WrapperSettings(
        remove_args=frozenset(split_list(environment.get("KPCC_REMOVE_ARGS", ""))),
        append_args=tuple(split_list(environment.get("KPCC_APPEND_ARGS", ""))),
        ignore_changes=tuple(ignore),
        debug=debug,
    )
