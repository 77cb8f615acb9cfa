"""The command-line tools: ``libcare-ctl``, ``libcare-patch-make``, ``libcare-cc``, ``libcare-dump``.

Each tool's argument parsing lives beside the stage it drives; this module maps tool
names to them, turns :class:`CareError` into a one-line message and an exit code, and
implements ``libcare-dump``.
"""

from __future__ import annotations

import importlib
import os
import sys

from .errors import CareError

# tool name -> (module relative to this package, function taking argv, returning exit code)
TOOLS: dict[str, tuple[str, str]] = {
    "ctl": (".apply.ctl", "main"),
    "patch-make": (".patchbuild.patchmake", "main"),
    "cc": (".patchbuild.compiler", "main"),
    "c++": (".patchbuild.compiler", "main_cxx"),
    "dump": (".cli", "dump_main"),
}


def main(tool: str, argv: list[str]) -> int:
    """Run ``tool`` with ``argv``; return its exit status."""
    if tool not in TOOLS:
        print(f"libcare: unknown tool {tool!r}", file=sys.stderr)
        return 2
    module_name, function_name = TOOLS[tool]
    try:
        if tool == "ctl":
            if argv[:1] == ["watch"]:
                module_name, function_name, argv = ".watch.command", "main", argv[1:]
            else:
                from .watch.client import forward  # socket + json only: no engine import

                forwarded = forward(argv)
                if forwarded is not None:
                    return forwarded
        module = importlib.import_module(module_name, __package__)
        return getattr(module, function_name)(argv)
    except CareError as exc:
        print(f"libcare-{tool}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `libcare-dump --json X | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def dump_main(argv: list[str]) -> int:
    """``libcare-dump [--json] PATCHFILE``: show a patch's header and functions."""
    import argparse
    import json

    from .patchfile import load_patch, summarize

    parser = argparse.ArgumentParser(prog="libcare-dump", description="Show what a binary patch contains.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("patchfile")
    args = parser.parse_args(argv)
    summary = summarize(load_patch(args.patchfile))
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return 0
    print(f"build-id: {summary.build_id}")
    print(f"level:    {summary.level}")
    print(f"size:     {summary.total_size} bytes (ELF image {summary.elf_size})")
    for name, size in sorted(summary.sections.items()):
        print(f"section:  {name} {size} bytes")
    for function in summary.functions:
        print(f"replaces: {function.name} ({function.orig_size} -> {function.new_size} bytes)")
    for name in summary.new_functions:
        print(f"adds:     {name}")
    return 0
