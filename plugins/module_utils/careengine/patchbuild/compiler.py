"""``libcare-cc``: a gcc wrapper that keeps each C unit's assembler for the asm diff.

Driven by environment variables, like LibCare's wrapper:

``KPATCH_STAGE``
    ``original`` or ``patched``; unset, ``configure`` or anything else (and any
    argument containing ``conftest.``) means exact pass-through (``os.execv`` of the
    real compiler with the same arguments).
``KPCCREAL`` / ``KPCXXREAL``
    the real C / C++ compiler (default ``/usr/bin/gcc`` / ``/usr/bin/g++``).
``KPATCH_PREFIX``
    prefix of the kept assembler files (default ``.kpatch_``).
``KPCC_REMOVE_ARGS``, ``KPCC_APPEND_ARGS``, ``KPCC_DBGFILTER_ARGS``, ``KPCC_PATCH_ARGS``, ``KPCC_DEBUG``
    LibCare's settings, with its meaning (differences: :mod:`.ccsettings`).
``LPMAKE_PROGRESS_FILE``
    set by ``libcare-patch-make``: one line per unit compiled or diffed (:mod:`.progress`).

Response files (``@file`` arguments) are expanded first, as gcc does.

For a compile (``-c`` or ``-S``) of one C source with output ``DIR/BASE.o`` it runs
the real compiler with ``-S -o DIR/.kpatch_BASE.<stage>.s -aux-info
DIR/.kpatch_BASE.<stage>.aux`` and the same other flags, then

* stage ``original``: assembles that ``.s`` into the requested output;
* stage ``patched``: diffs it against ``DIR/.kpatch_BASE.original.s`` (missing: every
  function is new) with :func:`asm.gensrc.generate`, checks that no changed function
  changed its signature (from the two ``-aux-info`` files), writes the instrumented
  ``DIR/.kpatch_BASE.s`` and assembles that.

C++ units (``.cc``, ``.cpp``... or ``-x c++``) are compiled the same way, without
``-aux-info``; in the patched stage the diff's result must pass :mod:`asm.cxx` and
:mod:`asm.cxx_data` (new data the new code initialises itself): anything else is refused
naming the functions or objects demangled, never left out of the patch unnoticed. A unit
with changed or new functions must keep the layout of every type its debug information
describes in both versions (:mod:`.layout_check`; units built without ``-g`` have none).

``-c`` with several C sources and no ``-o`` is done one source at a time. A compile and
link in one command (``cc -o prog a.c b.c``) compiles each C source as above to a
temporary object beside the output and links those. Links get ``-Wl,-q`` (keep
relocations, needed for extraction), ``-Wl,--build-id`` and ``-Wl,--no-gc-sections``
(a project's ``--gc-sections`` would drop the unreferenced ``.kpatch`` sections); in the patched
stage a link is refused when one unit changed an inline function or template instance that
another emits unchanged (:mod:`.comdat_link`). Everything else
(``-E``, ``-M``/``-MM``, ``-v``, ``--version``, ``-print-*``, ``-dump*``, sources in other languages,
``-x`` in a compile and link, ``-flto``, reading from stdin) passes through unchanged.
The wrapper adds no diagnostics of its own to a successful compile.

Only ``os`` and ``sys`` are imported on the pass-through path: it runs for every
configure probe and must stay cheap.
"""

from __future__ import annotations

import os
import sys

STAGES = ("original", "patched")
DEFAULT_CC = "/usr/bin/gcc"
DEFAULT_CXX = "/usr/bin/g++"
DEFAULT_PREFIX = ".kpatch_"
# Keep relocations (extraction reads them), a build-id (patches are bound to it), and
# no section garbage collection: nothing references the .kpatch sections, and both
# stages must keep the same sections for the original layout to be reproduced.
LINK_ARGS = ("-Wl,-q", "-Wl,--build-id", "-Wl,--no-gc-sections")

# Options whose argument is the next word when given alone ("-o out", "-I dir").
_OPTIONS_WITH_ARGUMENT = frozenset({
    "-o", "-x", "-I", "-D", "-U", "-include", "-imacros", "-idirafter", "-iprefix",
    "-iwithprefix", "-iwithprefixbefore", "-isystem", "-isysroot", "-iquote", "-imultilib",
    "-MF", "-MT", "-MQ", "-L", "-l", "-Xlinker", "-Xassembler", "-Xpreprocessor",
    "-aux-info", "-T", "-u", "-z", "--param", "-e", "-wrapper", "-specs", "-B", "-G", "-A",
    "-dumpbase", "-dumpbase-ext", "-dumpdir", "--sysroot", "-arch", "-Xclang",
})
# Invocations that only query or preprocess: always passed through.
_QUERY_OPTIONS = frozenset({"-E", "-M", "-MM", "-v", "--version", "--help", "-###", "--target-help",
                            "-fsyntax-only", "-dumpversion", "-dumpfullversion", "-dumpmachine",
                            "-dumpspecs"})
_QUERY_PREFIXES = ("-print-", "--print-", "--help=")
# Dependency-generation options, dropped when assembling.
_DEPENDENCY_FLAGS = frozenset({"-MD", "-MMD", "-MP", "-MG"})
_DEPENDENCY_WITH_ARGUMENT = frozenset({"-MF", "-MT", "-MQ"})
# Options that only matter to the link step, dropped from the compile of a compile+link.
_LINK_ONLY_FLAGS = frozenset({"-shared", "-static", "-static-pie", "-static-libgcc", "-pie", "-no-pie",
                              "-rdynamic", "-s", "-nostdlib", "-nostartfiles", "-nodefaultlibs", "-r"})
_LINK_ONLY_WITH_ARGUMENT = frozenset({"-l", "-L", "-Xlinker", "-T", "-u", "-z"})
_LINK_ONLY_PREFIXES = ("-Wl,", "-l", "-L")

C_SUFFIXES = (".c",)
CXX_SUFFIXES = (".cc", ".cp", ".cxx", ".cpp", ".CPP", ".c++", ".C")


def main(argv: list[str]) -> int:
    """``libcare-cc ARGS...``: compile like gcc, keeping assembler for the patch build."""
    return run(argv, cxx=False)


def main_cxx(argv: list[str]) -> int:
    """``libcare-c++ ARGS...``: the same for g++ (which C++ changes are accepted: :mod:`asm.cxx`)."""
    return run(argv, cxx=True)


def real_compiler(cxx: bool = False) -> str:
    """The compiler we stand in for (``KPCCREAL`` / ``KPCXXREAL``)."""
    if cxx:
        return os.environ.get("KPCXXREAL") or DEFAULT_CXX
    return os.environ.get("KPCCREAL") or DEFAULT_CC


def run(argv: list[str], cxx: bool = False) -> int:
    """Decide what the invocation needs and do it; return the exit status."""
    real = real_compiler(cxx)
    stage = os.environ.get("KPATCH_STAGE", "")
    if stage not in STAGES or any("conftest." in arg for arg in argv):
        return _exec(real, argv)
    if any(arg.startswith("@") for arg in argv):
        argv = expand_response_files(argv)
    invocation = parse_invocation(argv)
    if invocation.query or not invocation.inputs:
        return _exec(real, argv)
    from .ccsettings import from_environment

    global _settings
    _settings = from_environment()
    if _settings.debug:
        _settings.trace(f"KPATCH_STAGE={stage} real compiler {real}; remove {sorted(_settings.remove_args)}, "
                        f"append {list(_settings.append_args)}, ignore changes of {list(_settings.ignore_changes)}")
        if _settings.debug > 1:
            _settings.trace("ran as " + " ".join(argv))
    if _settings.remove_args or _settings.append_args:
        argv = _settings.modify(argv)
        invocation = parse_invocation(argv)
    if invocation.compile_only:
        return _compile(real, invocation, stage)
    if invocation.sources and _we_compile_before_linking(invocation):
        return _compile_and_link(real, invocation, stage)
    if stage == "patched":
        _check_comdat_units([path for _, path in invocation.inputs], invocation.flags)
    return _exec(real, argv + _link_args(argv))


def _check_comdat_units(inputs: list[str], flags: list[str]) -> None:
    """Before a patched-stage link: the units emitting a changed inline function agree (:mod:`.comdat_link`)."""
    from .comdat_link import check_link, library_inputs

    check_link(inputs + library_inputs(flags), _settings.ignored_functions)


class _QuietSettings:
    """Stands in for :class:`.ccsettings.WrapperSettings` before the environment is read."""

    debug = 0
    ignore_changes: tuple[str, ...] = ()

    def trace(self, message: str) -> None:
        del message

    def ignored_functions(self, source: str) -> tuple[str, ...]:
        del source
        return ()


_settings = _QuietSettings()
_MAX_RESPONSE_DEPTH = 10


def expand_response_files(argv: list[str], depth: int = 0) -> list[str]:
    """``@file`` arguments replaced by the words of that file (quotes and backslashes as gcc reads them).

    A ``@name`` that is not a readable file stays as it is, as with gcc.
    """
    import shlex

    expanded: list[str] = []
    for arg in argv:
        if not arg.startswith("@") or depth >= _MAX_RESPONSE_DEPTH:
            expanded.append(arg)
            continue
        try:
            with open(arg[1:], encoding="utf-8", errors="surrogateescape") as stream:
                words = shlex.split(stream.read(), posix=True)
        except (OSError, ValueError):
            expanded.append(arg)
            continue
        expanded.extend(expand_response_files(words, depth + 1))
    return expanded


def _we_compile_before_linking(invocation: Invocation) -> bool:
    """A compile and link we split: only C sources, no -x, no dependency output, no LTO."""
    only_c = all(_is_handled(lang, path) for lang, path in invocation.sources)
    return only_c and not (invocation.has_x or invocation.has_dependency_flags or invocation.lto)


class Invocation:
    """A gcc command line taken apart (only what the wrapper needs)."""

    def __init__(self) -> None:
        self.argv: list[str] = []
        self.flags: list[str] = []             # everything but inputs, -o and -c/-S
        self.inputs: list[tuple[str, str]] = []  # (language or "", path), in order
        self.sources: list[tuple[str, str]] = []  # compilable sources among inputs
        self.output: str | None = None
        self.mode: str | None = None           # "-c", "-S" or None (link)
        self.query = False
        self.has_x = False
        self.has_dependency_flags = False
        self.lto = False

    @property
    def compile_only(self) -> bool:
        return self.mode is not None


def parse_invocation(argv: list[str]) -> Invocation:
    """Split ``argv`` into flags, inputs, output and mode."""
    inv = Invocation()
    inv.argv = list(argv)
    language = ""
    index = 0
    while index < len(argv):
        arg = argv[index]
        takes_next = arg in _OPTIONS_WITH_ARGUMENT and index + 1 < len(argv)
        value = argv[index + 1] if takes_next else None
        if arg in _QUERY_OPTIONS or arg.startswith(_QUERY_PREFIXES):
            inv.query = True
        language = _take_argument(inv, arg, value, takes_next, language)
        index += 2 if takes_next else 1
    return inv


def _take_argument(inv: Invocation, arg: str, value: str | None, takes_next: bool, language: str) -> str:
    """Record one argument (with its ``value`` if it takes one); the input language in force after it."""
    if arg == "-o" and value is not None:
        inv.output = value
    elif arg.startswith("-o") and len(arg) > 2 and not takes_next:
        inv.output = arg[2:]
    elif arg in ("-c", "-S"):
        if inv.mode != "-S":
            inv.mode = arg
    elif arg == "-x" or (arg.startswith("-x") and len(arg) > 2):
        return _take_language(inv, arg, value)
    elif arg == "-" or not arg.startswith("-") or arg == "":
        _take_input(inv, language, arg)
    else:
        _take_flag(inv, arg, value)
    return language


def _take_language(inv: Invocation, arg: str, value: str | None) -> str:
    """``-x LANG``: kept as a flag; the language of the inputs after it ("" for ``none``)."""
    inv.has_x = True
    language = value if value is not None else arg[2:]
    inv.flags.extend([arg] + ([value] if value is not None else []))
    return "" if language == "none" else language


def _take_input(inv: Invocation, language: str, arg: str) -> None:
    """An input file (``-`` is stdin: a query, nothing to keep)."""
    inv.inputs.append((language, arg))
    if arg == "-":
        inv.query = True
    if _is_source(language, arg):
        inv.sources.append((language, arg))


def _take_flag(inv: Invocation, arg: str, value: str | None) -> None:
    """Any other option, with its value if it takes one."""
    if arg in _DEPENDENCY_FLAGS or arg in _DEPENDENCY_WITH_ARGUMENT:
        inv.has_dependency_flags = True
    if arg.startswith("-flto") and arg != "-fno-lto":
        inv.lto = True
    inv.flags.append(arg)
    if value is not None:
        inv.flags.append(value)


def _is_source(language: str, path: str) -> bool:
    if language:
        return language not in ("assembler", "assembler-with-cpp", "none") and not language.endswith("-header")
    return path.endswith(C_SUFFIXES + CXX_SUFFIXES + (".s", ".S", ".i", ".ii", ".m", ".f", ".f90"))


def _is_c(language: str, path: str) -> bool:
    if language:
        return language == "c"
    return path.endswith(C_SUFFIXES)


def _is_cxx(language: str, path: str) -> bool:
    if language:
        return language == "c++"
    return path.endswith(CXX_SUFFIXES)


def _is_handled(language: str, path: str) -> bool:
    """C units are diffed; C++ units are compiled through kept assembler so a change is refused, not lost."""
    return _is_c(language, path) or _is_cxx(language, path)


def _exec(real: str, argv: list[str]) -> int:
    _settings.trace(" ".join([real] + argv))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(real, [real] + argv)
    except OSError as exc:
        print(f"libcare-cc: cannot run the real compiler {real}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


def _link_args(argv: list[str]) -> list[str]:
    if "-r" in argv or "-c" in argv or "-S" in argv:
        return []
    return list(LINK_ARGS)


def _run(command: list[str]) -> int:
    import subprocess

    _settings.trace(" ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        return subprocess.run(command, check=False).returncode
    except OSError as exc:
        print(f"libcare-cc: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def _compile(real: str, inv: Invocation, stage: str) -> int:
    """``-c``/``-S``: one C source handled, several done one by one, others passed through."""
    if inv.lto or not inv.sources or len(inv.sources) != len(inv.inputs):
        return _exec(real, inv.argv)
    if inv.output is not None and (inv.output.startswith("/dev/") or inv.output == "-"):
        return _exec(real, inv.argv)      # a probe: nothing to keep
    if any(not _is_handled(lang, path) for lang, path in inv.sources):
        return _exec(real, inv.argv)
    if len(inv.sources) > 1:
        if inv.output is not None:
            return _exec(real, inv.argv)   # gcc refuses this itself; let it say so
        for lang, path in inv.sources:
            status = compile_unit(real, _flags_for_unit(inv.flags, lang), path,
                                  _default_output(path, inv.mode), inv.mode or "-c", stage)
            if status:
                return status
        return 0
    lang, path = inv.sources[0]
    output = inv.output if inv.output is not None else _default_output(path, inv.mode)
    return compile_unit(real, _flags_for_unit(inv.flags, lang), path, output, inv.mode or "-c", stage)


def _flags_for_unit(flags: list[str], language: str) -> list[str]:
    """Flags with any ``-x`` removed, ``-x c`` in front when the language was explicit."""
    kept = _drop(flags, drop={"-x"}, drop_with_argument={"-x"}, drop_prefixes=("-x",))
    return (["-x", language] if language else []) + kept


def _default_output(source: str, mode: str | None) -> str:
    stem = os.path.splitext(os.path.basename(source))[0]
    return stem + (".s" if mode == "-S" else ".o")


def _drop(flags: list[str], drop: frozenset[str] | set[str] = frozenset(),
          drop_with_argument: frozenset[str] | set[str] = frozenset(),
          drop_prefixes: tuple[str, ...] = ()) -> list[str]:
    """``flags`` without the given options (and the arguments of those that take one)."""
    kept: list[str] = []
    index = 0
    while index < len(flags):
        arg = flags[index]
        if arg in drop_with_argument and index + 1 < len(flags):
            index += 2
            continue
        if arg in drop or (drop_prefixes and arg.startswith(drop_prefixes)):
            index += 1
            continue
        kept.append(arg)
        if arg in _OPTIONS_WITH_ARGUMENT and index + 1 < len(flags):
            kept.append(flags[index + 1])
            index += 1
        index += 1
    return kept


def kept_asm_path(unit: str, stage: str | None, suffix: str = ".s") -> str:
    """Where the assembler of ``unit`` (``DIR/BASE``) is kept: ``DIR/.kpatch_BASE.<stage>.s``.

    ``stage`` None is the instrumented file of the patched stage.
    """
    prefix = os.environ.get("KPATCH_PREFIX") or DEFAULT_PREFIX
    middle = f".{stage}" if stage else ""
    return os.path.join(os.path.dirname(unit), f"{prefix}{os.path.basename(unit)}{middle}{suffix}")


def unit_of(output: str) -> str:
    """The unit name of an object: its path without the extension."""
    return os.path.splitext(output)[0]


def compile_unit(real: str, flags: list[str], source: str, output: str, mode: str, stage: str,
                 unit: str | None = None) -> int:
    """Compile one C or C++ source to ``output`` through kept assembler (see module docstring)."""
    unit = unit or unit_of(output)
    stage_asm = kept_asm_path(unit, stage)
    stage_aux = kept_asm_path(unit, stage, ".aux")
    cxx = _is_cxx(flags[1] if flags[:1] == ["-x"] else "", source)
    compile_flags = list(flags)
    driver_deps = any(flag in ("-MD", "-MMD") for flag in flags)
    preprocessor_deps = any(flag.startswith(("-Wp,-MD,", "-Wp,-MMD,")) for flag in flags)
    if driver_deps or preprocessor_deps:
        # The dependency file and its target must name the real output, not our .s.
        if driver_deps and "-MF" not in flags:
            compile_flags += ["-MF", os.path.splitext(output)[0] + ".d"]
        if "-MT" not in flags and "-MQ" not in flags:
            compile_flags += ["-MT", output]
    aux_info = [] if cxx else ["-aux-info", stage_aux]     # -aux-info is for C only
    status = _run([real] + compile_flags + ["-S", "-o", stage_asm, *aux_info, source])
    if status:
        return status
    from .progress import COMPILED, DIFFED, note_unit

    note_unit(COMPILED, unit)
    asm_path = stage_asm
    if stage == "patched":
        asm_path = kept_asm_path(unit, None)
        changed = _write_instrumented(source, unit, stage_asm, stage_aux, asm_path, cxx=cxx)
        note_unit(DIFFED, "changed" if changed else "same")
    if mode == "-S":
        import shutil

        shutil.copyfile(asm_path, output)
        return 0
    assemble_flags = _drop(flags, drop=_DEPENDENCY_FLAGS, drop_with_argument=_DEPENDENCY_WITH_ARGUMENT | {"-x"},
                           drop_prefixes=("-x",))
    return _run([real] + assemble_flags + ["-c", "-x", "assembler", asm_path, "-o", output])


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as stream:
            return stream.read()
    except FileNotFoundError:
        return ""


def _write_instrumented(source: str, unit: str, patched_asm: str, patched_aux: str, target: str,
                        cxx: bool = False) -> bool:
    """Diff the unit's original and patched assembler; write the instrumented file.

    C units: prototypes must not change (``-aux-info``). C++ units: only the changes
    :mod:`asm.cxx` and :mod:`asm.cxx_data` accept. Both: no struct, union or class may
    change its layout (:mod:`.layout_check`, from the units' debug information).
    Returns True when the unit has changed or new functions.
    """
    from ..errors import BuildError, CareError

    try:
        from ..asm import gensrc
    except ImportError as exc:
        raise BuildError(f"{source}: the asm diff (careengine.asm.gensrc) is not available: {exc}") from None
    original_text = _read_text(kept_asm_path(unit, "original"))
    original_aux = _read_text(kept_asm_path(unit, "original", ".aux"))
    patched_text = _read_text(patched_asm)
    if original_text and patched_text == original_text and _read_text(patched_aux) == original_aux:
        # Unchanged unit (a header it includes was patched, say): nothing to diff.
        _write_text(target, original_text)
        return False
    try:
        # No filename= here: the except clause below names the source once for both steps.
        if cxx and original_text:
            from ..asm import cxx_data
            from ..asm.parse import parse

            cxx_data.check_static_init(parse(original_text), parse(patched_text))
        result = gensrc.generate(original_text, patched_text, ignore_changes=_settings.ignored_functions(source))
        if cxx:
            from ..asm import cxx as cxx_rules
            from ..asm.parse import parse

            cxx_rules.check_change(parse(patched_text), result.changed_functions, result.new_functions,
                                   result.new_variables)
        elif original_text:
            gensrc.check_signatures(gensrc.parse_aux_info(original_aux), gensrc.parse_aux_info(_read_text(patched_aux)),
                                    result.changed_functions)
        if original_text and (result.changed_functions or result.new_functions):
            from .layout_check import check_layouts

            if not check_layouts(kept_asm_path(unit, "original"), patched_asm):
                from .progress import UNCHECKED_LAYOUT, note_unit

                note_unit(UNCHECKED_LAYOUT, source)
    except CareError as exc:
        raise type(exc)(f"{source}: {exc}") from None
    _write_text(target, result.text)
    return bool(result.changed_functions or result.new_functions)


def _write_text(target: str, text: str) -> None:
    temporary = target + ".tmp"
    with open(temporary, "w", encoding="utf-8", errors="surrogateescape") as stream:
        stream.write(text)
    os.replace(temporary, target)


def _compile_and_link(real: str, inv: Invocation, stage: str) -> int:
    """``cc [flags] -o prog a.c b.o``: compile each C source ourselves, then link."""
    output = inv.output or "a.out"
    directory = os.path.dirname(output)
    compile_flags = _drop(inv.flags, drop=_LINK_ONLY_FLAGS, drop_with_argument=_LINK_ONLY_WITH_ARGUMENT,
                          drop_prefixes=_LINK_ONLY_PREFIXES)
    objects: dict[str, str] = {}
    try:
        for _, path in inv.sources:
            stem = os.path.splitext(os.path.basename(path))[0]
            obj = os.path.join(directory, f"{stem}.{os.getpid()}.lcc.o")
            objects[path] = obj
            status = compile_unit(real, compile_flags, path, obj, "-c", stage, unit=os.path.join(directory, stem))
            if status:
                return status
        link_argv = [objects.get(arg, arg) for arg in inv.argv]
        if stage == "patched":
            _check_comdat_units([objects.get(path, path) for _, path in inv.inputs], inv.flags)
        return _run([real] + link_argv + _link_args(link_argv))
    finally:
        for obj in objects.values():
            if os.path.exists(obj):
                os.unlink(obj)
