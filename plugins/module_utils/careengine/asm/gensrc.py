"""Entry point of the assembler diff (the kpatch_gensrc equivalent).

:func:`generate` compares gcc's assembler output for the original and the patched
source of one compilation unit and returns the instrumented assembler to assemble
instead of the patched one. :func:`parse_aux_info` and :func:`check_signatures` refuse
changes of function prototypes, read from ``gcc -aux-info`` output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from itertools import zip_longest

from ..errors import AsmParseError, CareError, UnpatchableChange
from . import cxx, emit, match, parse
from .normalize import IGNORED_KINDS, collapse_blanks, statement_text

# Names of compiler-made variables that are not worth reporting as "new variables".
UNREPORTED_VARIABLE_PREFIXES = (".L", "CSWTCH.")
# Kinds of statements in "other" blocks that do not matter when comparing them.
OTHER_IGNORED_KINDS = IGNORED_KINDS | {parse.Kind.SECTION, parse.Kind.ALIGN}


@dataclass(frozen=True)
class GensrcResult:
    """The instrumented assembler and what changed in the compilation unit."""

    text: str
    changed_functions: tuple[str, ...]
    new_functions: tuple[str, ...]
    new_variables: tuple[str, ...]


def generate(original_asm: str, patched_asm: str, *, filename: str = "",
             ignore_changes: Iterable[str] = ()) -> GensrcResult:
    """Compare two gcc assembler outputs and write the instrumented assembler.

    Functions named in ``ignore_changes`` (LibCare's ``--ignore-changes``) keep their
    original code even when they changed.

    Raises :class:`UnpatchableChange` for changes a live patch cannot carry (existing
    data changed or removed, top-level statements changed, new thread-local data) and
    :class:`AsmParseError` for input that is not understood.
    """
    try:
        original = parse.parse(original_asm)
        patched = parse.parse(patched_asm)
        matching = match.match(original, patched)
        ignored = set(ignore_changes)
        if ignored:
            matching = replace(matching, changed_functions=tuple(
                name for name in matching.changed_functions if name not in ignored))
        _check_other_blocks(original, patched, matching)
        names = _output_names(original, patched, matching)
        patched_functions = patched.functions()
        patched_variables = patched.variables()
        pairs = dict(matching.function_pairs)
        text = emit.render(
            original, patched,
            changed={name: patched_functions[pairs[name]] for name in matching.changed_functions},
            new_functions=[patched_functions[name] for name in matching.new_functions],
            new_variables=[patched_variables[name] for name in matching.new_variables],
            names=names,
            to_original=matching.patched_to_original,
        )
    except CareError as error:
        class_data = cxx.describe_class_data(str(error)) if isinstance(error, UnpatchableChange) else None
        if class_data:
            error = UnpatchableChange(class_data)
        if filename:
            raise type(error)(f"{filename}: {error}") from error
        if class_data:
            raise error from None
        raise
    return GensrcResult(
        text=text,
        changed_functions=matching.changed_functions,
        new_functions=matching.new_functions,
        new_variables=tuple(name for name in matching.new_variables
                            if not name.startswith(UNREPORTED_VARIABLE_PREFIXES)),
    )


def _output_names(original: parse.AsmFile, patched: parse.AsmFile, matching: match.Matching) -> dict[str, str]:
    """Every symbol the patched file defines -> the name patched code uses for it in the output."""
    changed = set(matching.changed_functions)
    to_original = matching.patched_to_original
    functions = patched.functions()
    names: dict[str, str] = {}
    for original_name, patched_name in matching.function_pairs:
        for name in functions[patched_name].names:
            target = to_original.get(name, name)
            names[name] = emit.kpatch_name(target) if original_name in changed else target
    for patched_name in matching.new_functions:
        for name in functions[patched_name].names:
            names[name] = emit.kpatch_name(name) if match.is_auto_named(patched_name) else name
    for name in patched.variables():
        if name in to_original:
            names[name] = to_original[name]
        else:
            names[name] = emit.kpatch_name(name) if match.is_auto_named(name) else name
    return names


def _other_statements(asm: parse.AsmFile, rename) -> list[str]:
    return [collapse_blanks(statement_text(line, rename))
            for block in asm.blocks if block.kind == "other"
            for line in block.lines if line.kind not in OTHER_IGNORED_KINDS]


def _check_other_blocks(original: parse.AsmFile, patched: parse.AsmFile, matching: match.Matching) -> None:
    """Statements outside functions and variables (constructors' table, aliases...) must not change."""
    to_original = matching.patched_to_original
    before = _other_statements(original, lambda token: token)
    after = _other_statements(patched, lambda token: to_original.get(token, token))
    if before != after:
        differing = next(pair for pair in zip_longest(before, after, fillvalue="<nothing>") if pair[0] != pair[1])
        raise UnpatchableChange(
            f"statements outside functions and variables changed ({differing[0]!r} became {differing[1]!r}); "
            "constructors, aliases and top-level asm cannot be changed by a live patch"
        )


# gcc -aux-info line: /* file.c:12:NF */ extern int foo (int x); /* (x) int x; */
AUX_INFO_RE = re.compile(r"^/\* (?P<where>.*):(?P<line>\d+):(?P<style>[NOI])(?P<origin>[CF]) \*/ (?P<decl>.*?;)")
STORAGE_WORDS = ("extern", "static", "inline", "__inline", "__inline__")
C_WORDS = frozenset((
    "void", "char", "short", "int", "long", "float", "double", "signed", "unsigned", "_Bool", "const", "volatile",
    "restrict", "__restrict", "struct", "union", "enum", "_Complex", "register", "__int128",
))
IDENTIFIER_RE = re.compile(r"[A-Za-z_]\w*")


def parse_aux_info(text: str) -> dict[str, str]:
    """Prototypes of the functions DEFINED in a unit, from ``gcc -aux-info`` output.

    Returns function name -> prototype with parameter names and storage class removed
    and blanks normalised, e.g. ``{"foo": "int foo (int, const char *)"}``.
    """
    prototypes: dict[str, str] = {}
    for line in text.splitlines():
        found = AUX_INFO_RE.match(line)
        if not found or found.group("origin") != "F":
            continue
        name, prototype = _normalize_prototype(found.group("decl"))
        prototypes[name] = prototype
    return prototypes


def _normalize_prototype(declaration: str) -> tuple[str, str]:
    declaration = declaration.rstrip(";").strip()
    words = declaration.split()
    while words and words[0] in STORAGE_WORDS:
        words.pop(0)
    declaration = " ".join(words)
    found = re.search(r"([A-Za-z_]\w*)\s*\(", declaration)
    if not found:
        raise AsmParseError(f"cannot read prototype {declaration!r} in -aux-info output")
    name = found.group(1)
    open_paren = found.end() - 1
    close_paren = _matching_paren(declaration, open_paren)
    parameters = parse.split_top_level(declaration[open_paren + 1:close_paren], "([", ")]")
    stripped = ", ".join(_drop_parameter_name(parameter) for parameter in parameters)
    prototype = f"{declaration[:open_paren].strip()} ({stripped}){declaration[close_paren + 1:]}"
    return name, " ".join(prototype.split())


def _matching_paren(text: str, open_paren: int) -> int:
    depth = 0
    for index in range(open_paren, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    raise AsmParseError(f"unbalanced parentheses in prototype {text!r}")


def _drop_parameter_name(parameter: str) -> str:
    """``const char *name`` -> ``const char *``; ``int (*cb)(int)`` -> ``int (*)(int)``."""
    if parameter in ("void", "..."):
        return parameter
    pointer_group = re.search(r"\(\s*\*+\s*(?:const\s+)?([A-Za-z_]\w*)\s*\)", parameter)
    if pointer_group:
        start, end = pointer_group.span(1)
        return " ".join((parameter[:start] + parameter[end:]).split())
    head = parameter.split("[", 1)[0]
    suffix = parameter[len(head):]
    identifiers = list(IDENTIFIER_RE.finditer(head))
    if len(identifiers) >= 2 and identifiers[-1].group() not in C_WORDS:
        last = identifiers[-1]
        head = head[:last.start()] + head[last.end():]
    return " ".join((head + suffix).split())


def check_signatures(original: dict[str, str], patched: dict[str, str], changed: Iterable[str]) -> None:
    """Refuse a patch that changes the prototype of a function existing in both versions.

    Callers compiled against the old prototype keep calling the replaced function, so
    its parameters and return type must stay. ``changed`` functions are checked first.
    """
    changed_names = list(changed)
    for name in changed_names + sorted(set(original) - set(changed_names)):
        if name in original and name in patched and original[name] != patched[name]:
            raise UnpatchableChange(
                f"function {name}: prototype changed from '{original[name]}' to '{patched[name]}'; "
                "a live patch cannot change a function's signature"
            )
