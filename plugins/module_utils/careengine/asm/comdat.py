"""Patch code of functions in COMDAT groups: one copy in the patch, the same in every unit.

g++ emits an inline function or a template instance in every unit that uses it without
inlining it, each copy in a COMDAT group keyed on the symbol (``.text._Z5scalei,"axG",
@progbits,_Z5scalei,comdat``); the linker keeps the first unit's copy and drops the
others. A change that reaches such a function shows it changed in every unit emitting it.

Each unit writes its patched body, with everything that refers to it (strtab entry,
``.kpatch.info`` record, unwind records, pointer slots), in a COMDAT group of its own
keyed ``<symbol>.kpatch`` (:func:`grouped`), so the patched link keeps exactly one copy
and one info record. The body's symbol is weak and hidden (:func:`shared_symbol_lines`):
the patched callers of every unit reach the one copy that was kept. The info record names
the original function by symbol, so the jump goes at the copy the original link kept.

Outside the group, each unit also records a digest of its patched body in the
non-allocated section :data:`DIGEST_SECTION` (:func:`digest_lines`); the extraction reads
every unit's record from the patched link and refuses a function whose copies differ
(:func:`differing_copies`: units compiled with different flags or macros), since the
patch could carry only one of them. A unit that emits the function without changing it
records nothing here: the patched stage's link refuses it (:mod:`..patchbuild.comdat_link`
reads which units have the ``<symbol>`` group but not ``<symbol>.kpatch``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

from .match import family, is_auto_named
from .normalize import block_signature, symbol_tokens
from .parse import Block

GROUP_SUFFIX = ".kpatch"
DIGEST_SECTION = ".libcare.comdat"
DIGEST_SPEC = f'{DIGEST_SECTION},"",@progbits'
# "name,"flags",@type[,...]" of a section spec.
SPEC_RE = re.compile(r'^(?P<name>[^,]+),"(?P<flags>[^"]*)",(?P<type>@\w+)')
SECTION_LINE_RE = re.compile(r"^\t(?P<head>\.pushsection|\.section)\t(?P<spec>.+)$")


def comdat_group(section: str, section_specs: dict[str, str]) -> str | None:
    """The group key of ``section`` when it is a COMDAT section, else None."""
    fields = [field.strip() for field in section_specs.get(section, "").split(",")]
    if len(fields) >= 5 and "G" in fields[1] and fields[-1] == "comdat":
        return fields[3]
    return None


def group_name(symbol: str) -> str:
    """The key of the COMDAT group holding the patch code of ``symbol``."""
    return symbol + GROUP_SUFFIX


def grouped_spec(spec: str, group: str) -> str:
    """``spec`` (``.kpatch.text,"ax",@progbits``) as a section of COMDAT group ``group``."""
    found = SPEC_RE.match(spec)
    if found is None:
        raise ValueError(f"section spec {spec!r} has no flags and type")
    return f'{found["name"]},"{found["flags"]}G",{found["type"]},{group},comdat'


def grouped(lines: Iterable[str], group: str, specs: Iterable[str]) -> list[str]:
    """``lines`` with every switch to one of the ``specs`` sections made a switch to
    that section in COMDAT group ``group``."""
    in_group = {spec: grouped_spec(spec, group) for spec in specs}
    output = []
    for line in lines:
        found = SECTION_LINE_RE.match(line)
        if found and found["spec"] in in_group:
            line = f'\t{found["head"]}\t{in_group[found["spec"]]}'
        output.append(line)
    return output


def shared_symbol_lines(symbol: str) -> list[str]:
    """Make ``symbol`` (the new body) one symbol for every unit of the link, not exported."""
    return [f"\t.weak\t{symbol}", f"\t.hidden\t{symbol}"]


def _canonical(token: str) -> str:
    # gcc numbers literals and clones per unit (.LC3 here, .LC7 there).
    return family(token) if is_auto_named(token) else token


def _literals(block: Block, variables: Mapping[str, Block]) -> list[Block]:
    """The unit's compiler-named data (literals, tables) the body refers to, in order."""
    found: dict[str, Block] = {}
    for line in block.lines:
        for token in symbol_tokens(line.args) if line.args else ():
            if is_auto_named(token) and token in variables:
                found.setdefault(token, variables[token])
    return list(found.values())


def body_digest(block: Block, variables: Mapping[str, Block] | None = None) -> str:
    """A digest of a patched body that is equal for equal code in any unit.

    With ``variables`` (the unit's), the contents of the literals and tables the body
    refers to count too: a macro may change a string and not the code.
    """
    statements = list(block_signature(block, _canonical))
    for literal in _literals(block, variables or {}):
        statements += ["@literal", *block_signature(literal, _canonical)]
    return hashlib.sha256("\n".join(statements).encode("utf-8", errors="surrogateescape")).hexdigest()


def digest_lines(symbol: str, block: Block, variables: Mapping[str, Block] | None = None) -> list[str]:
    """The :data:`DIGEST_SECTION` record of one unit's patched copy of ``symbol``."""
    digest = body_digest(block, variables)
    return [f"\t.pushsection\t{DIGEST_SPEC}", f'\t.string\t"{symbol} {digest}"', "\t.popsection"]


def read_digests(section_data: bytes) -> dict[str, set[str]]:
    """Symbol -> the digests of its copies, from a linked :data:`DIGEST_SECTION`."""
    digests: dict[str, set[str]] = {}
    for record in section_data.split(b"\0"):
        fields = record.decode("utf-8", errors="surrogateescape").split()
        if len(fields) == 2:
            digests.setdefault(fields[0], set()).add(fields[1])
    return digests


def differing_copies(section_data: bytes) -> list[str]:
    """Symbols whose patched copies differ between units, sorted."""
    return sorted(symbol for symbol, found in read_digests(section_data).items() if len(found) > 1)
