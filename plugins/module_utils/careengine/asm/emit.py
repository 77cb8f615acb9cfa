"""Write the instrumented assembler file.

Layout: the patched file's header; every original block verbatim and in order (so the
patched link reproduces the original code and data layout byte for byte); after each
changed function, its patched body in ``.kpatch.text`` plus a name in ``.kpatch.strtab``
and a 48-byte ``.kpatch.info`` record; then new functions and new variables; then the
patched file's footer. In changed and new bodies, accesses to data the unit does not
define go through the GOT (:mod:`.gotpcrel`). Their ``.cfi_*`` directives become
``.kpatch.eh_frame`` records and their exception tables move to
``.kpatch.gcc_except_table`` (:mod:`.eh_frame`).

Section directives of re-emitted lines are written as explicit switches to the section
they lead to, so dropping debug sections or mixing lines of two files never leaves a
line in the wrong section.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import AsmParseError, UnpatchableChange
from . import comdat, eh_frame, gotpcrel
from .normalize import LOCAL_LABEL_PREFIX, rename_symbols
from .parse import BARE_SECTIONS, SECTIONLESS_KINDS, AsmFile, Block, Kind, Line, section_is_code, section_is_tls

KPATCH_TEXT = ".kpatch.text"
KPATCH_DATA = ".kpatch.data"
KPATCH_SUFFIX = ".kpatch"
# Name -> argument string of the sections we add (flags as LibCare writes them).
KPATCH_SECTIONS = {
    KPATCH_TEXT: '.kpatch.text,"ax",@progbits',
    KPATCH_DATA: '.kpatch.data,"aw",@progbits',
    ".kpatch.strtab": '.kpatch.strtab,"a",@progbits',
    ".kpatch.info": '.kpatch.info,"a",@progbits',
    **eh_frame.SECTION_SPECS,
}


# The label gcc puts where a function's cold part starts (before the function's block).
COLD_START_RE = re.compile(r"^\.LCOLDB\d+$")
# Statements whose meaning does not depend on the current section.
SECTION_INDEPENDENT_KINDS = frozenset((Kind.IDENT, Kind.FILE))


def end_label(name: str) -> str:
    """Label marking the end of an original function (its size for ``dlen``)."""
    return f"{name}.Lfe"


def kpatch_name(name: str) -> str:
    """The name a replaced or auto-named new symbol gets in the patch."""
    return name + KPATCH_SUFFIX


@dataclass(frozen=True)
class PatchedFunction:
    """A function body that goes into ``.kpatch.text``: changed (``original`` set) or new."""

    block: Block
    output_name: str
    original: str | None


class Output:
    """Collects output lines and tracks the current section of what was written."""

    def __init__(self, section_specs: dict[str, str]) -> None:
        self.section_specs = section_specs
        self.lines: list[str] = []
        self.section = ".text"

    def switch(self, section: str) -> None:
        """Make ``section`` current (writing a directive only if it is not)."""
        if section != self.section:
            self.lines.append("\t" + switch_directive(section, self.section_specs))
            self.section = section

    def copy(self, lines: Iterable[Line], before_size: dict[str, str] | None = None,
             rename: Callable[[str], str] | None = None) -> None:
        """Re-emit lines; ``before_size`` maps a symbol to a label put before its ``.size``.

        ``rename`` (for the patched file's header and footer) maps symbols to their
        names in the output.
        """
        for line in lines:
            if line.kind is Kind.SECTION:
                self.switch(line.section_after)
                continue
            if line.kind not in SECTION_INDEPENDENT_KINDS:
                self.switch(line.section)
            if before_size and line.kind is Kind.SIZE and line.first_arg() in before_size:
                self.lines.append(before_size[line.first_arg()] + ":")
            if rename is not None and line.args and line.kind is not Kind.SECTION:
                self.lines.append(f"\t{line.head}\t{rename_symbols(line.args, rename)}")
            else:
                self.lines.append(format_statement(line.text, line.kind))

    def raw(self, lines: Iterable[str]) -> None:
        """Append generated lines that leave the current section as it was."""
        self.lines.extend(lines)


def switch_directive(section: str, section_specs: dict[str, str]) -> str:
    """A directive that makes ``section`` current, with its flags if known."""
    if section in BARE_SECTIONS:
        return section
    spec = KPATCH_SECTIONS.get(section) or section_specs.get(section)
    return f".section\t{spec or section}"


def format_statement(text: str, kind: Kind) -> str:
    """A statement as an output line: labels in column 0, the rest indented."""
    return text if kind in (Kind.LABEL, Kind.DEBUG_LABEL) else "\t" + text


def patched_section(line_section: str, specs: dict[str, str], symbol: str) -> str:
    """The ``.kpatch.*`` section that receives lines the patched file put in ``line_section``."""
    spec = specs.get(line_section, "")
    if section_is_tls(line_section, spec):
        raise UnpatchableChange(f"{symbol}: new thread-local data cannot be added by a live patch")
    if line_section.startswith(eh_frame.EXCEPT_TABLE_PREFIX):
        return eh_frame.KPATCH_EXCEPT_TABLE
    return KPATCH_TEXT if section_is_code(line_section, spec) else KPATCH_DATA


def _block_renamer(block: Block, names: dict[str, str]) -> Callable[[str], str]:
    # Every label the block defines besides its own symbols (gcc's .L labels, labels of
    # inline asm) gets a suffix, so the copy does not collide with the original body.
    own_labels = {line.head for line in block.lines if line.kind in (Kind.LABEL, Kind.DEBUG_LABEL)
                  and line.head not in block.names and not line.head.isdigit()}
    # gcc marks the start of a function's cold part with .LCOLDB<n> just before the
    # function's block; the exception table of the cold part counts from it. In the
    # copy that start is the cold part's own symbol (nothing comes between them).
    cold_start = next((line.head for line in block.lines if line.kind is Kind.LABEL
                       and line.head.endswith(".cold")), None)

    def rename(token: str) -> str:
        if token in own_labels:
            return kpatch_name(token)
        mapped = names.get(token)
        if mapped is not None:
            return mapped
        if cold_start is not None and COLD_START_RE.match(token):
            return rename(cold_start)
        if token.startswith(LOCAL_LABEL_PREFIX):
            raise AsmParseError(f"{block.name}: reference to local label {token} defined outside the function")
        return token

    return rename


def _translated_lines(block: Block, specs: dict[str, str], rename: Callable[[str], str], *,
                      keep_attributes: bool, size_labels: dict[str, str], current: str,
                      defined: frozenset[str] | None = None,
                      unwind: eh_frame.UnwindCollector | None = None) -> list[str]:
    """Lines of a patched block with sections moved into ``.kpatch.*`` and symbols renamed.

    With ``defined`` (the unit's symbols), instructions reaching other symbols through
    ``sym(%rip)`` are rewritten to go through the GOT (:mod:`.gotpcrel`). With
    ``unwind``, ``.cfi_*`` directives become labels and records of ``.kpatch.eh_frame``
    (:mod:`.eh_frame`) instead of going to gas.
    """
    output: list[str] = []
    for line in block.lines:
        through_got = None
        if line.kind is Kind.INSTRUCTION and defined is not None:
            through_got = gotpcrel.rewrite(line.head, line.args, defined, block.name)
        if line.kind is Kind.SECTION or (line.kind is Kind.ATTRIBUTE and not keep_attributes):
            continue
        if line.kind is Kind.ATTRIBUTE and line.head == ".local":
            continue
        target = KPATCH_DATA if line.kind in SECTIONLESS_KINDS else patched_section(line.section, specs, block.name)
        if target != current:
            output.append(f"\t.section\t{KPATCH_SECTIONS[target]}")
            current = target
        if line.kind is Kind.SIZE and line.first_arg() in size_labels:
            output.append(size_labels[line.first_arg()] + ":")
        output.extend(_translated_line(line, rename, through_got, block.name, unwind))
    return output


def _translated_line(line: Line, rename: Callable[[str], str], through_got: list[gotpcrel.Statement] | None,
                     where: str, unwind: eh_frame.UnwindCollector | None) -> list[str]:
    """The output lines of one line of a patched block (symbols renamed)."""
    if line.kind is Kind.CFI and unwind is not None:
        args = rename_symbols(line.args, rename) if line.args else ""
        return unwind.directive(line.head, args, where)
    if line.kind is Kind.COMM:
        return _common_as_data(line, rename)
    if line.kind in (Kind.LABEL, Kind.DEBUG_LABEL):
        # Debug labels too: g++'s exception tables of the copy refer to them (.LFB, .LCOLDB).
        return [rename(line.head) + ":"]
    if through_got is not None:
        return [f"\t{head}\t{rename_symbols(args, rename)}".rstrip() for head, args in through_got]
    args = rename_symbols(line.args, rename) if line.args else ""
    return [f"\t{line.head}\t{args}".rstrip()]


def _common_as_data(line: Line, rename: Callable[[str], str]) -> list[str]:
    """``.comm x,size,align`` / ``.lcomm x,size[,align]`` as an aligned label and zeros."""
    fields = [part.strip() for part in line.args.split(",")]
    if len(fields) < 2:
        raise AsmParseError(f"line {line.number}: cannot read {line.text!r}")
    alignment = fields[2] if len(fields) > 2 else "8"
    return [f"\t.balign\t{alignment}", f"{rename(fields[0])}:", f"\t.zero\t{fields[1]}"]


def function_patch(function: PatchedFunction, specs: dict[str, str], names: dict[str, str],
                   strtab_index: int, defined: frozenset[str] | None = None) -> list[str]:
    """The ``.kpatch.text`` body, strtab entry and info record of one changed or new function.

    ``defined`` are the symbols of the compilation unit: the body reaches every other
    symbol through the GOT (no new copy relocation in the patched link). None: no rewrite.
    """
    block = function.block
    output_name = function.output_name
    end = (output_name if output_name.endswith(KPATCH_SUFFIX) else kpatch_name(output_name)) + "_end"
    slots: dict[str, str] = {}
    rename = _with_pointer_slots(_block_renamer(block, names), slots, f".Lkpref{strtab_index}_")
    unwind = eh_frame.UnwindCollector(f".Lkpcfi{strtab_index}_")
    body = _translated_lines(block, specs, rename, keep_attributes=function.original is None
                             and output_name == block.name, size_labels={block.name: end},
                             current=KPATCH_TEXT, defined=defined, unwind=unwind)
    if unwind.open_region():
        raise AsmParseError(f"{block.name}: .cfi_startproc without .cfi_endproc")
    strtab_label = f"kpatch_strtab{strtab_index}"
    if function.original is None:
        original_address, original_length = "0", "0"
    else:
        original_address = function.original
        original_length = f"{end_label(function.original)} - {function.original}"
    return [
        f"\t.pushsection\t{KPATCH_SECTIONS[KPATCH_TEXT]}",
        *body,
        "\t.popsection",
        f"\t.pushsection\t{KPATCH_SECTIONS['.kpatch.strtab']}",
        f"{strtab_label}:",
        f'\t.string\t"{output_name}"',
        "\t.popsection",
        f"\t.pushsection\t{KPATCH_SECTIONS['.kpatch.info']}",
        f"{(function.original or output_name)}.Lpi:",
        f"\t.quad\t{original_address}",
        f"\t.quad\t{output_name}",
        f"\t.long\t{original_length}",
        f"\t.long\t{end} - {output_name}",
        f"\t.quad\t{strtab_label}",
        "\t.quad\t0",
        "\t.long\t0",
        "\t.byte\t0, 0, 0, 0",
        "\t.popsection",
        *unwind.records(),
        *_pointer_slot_lines(slots, rename),
    ]


# g++ reaches the personality routine and the typeinfo its exception tables name through
# hidden "DW.ref.X" pointers in COMDAT groups; the linker keeps one unit's copy and
# refuses references to the others' from any section but .eh_frame itself.
DW_REF_PREFIX = "DW.ref."


def _with_pointer_slots(rename: Callable[[str], str], slots: dict[str, str],
                        prefix: str) -> Callable[[str], str]:
    """``rename``, with every ``DW.ref.X`` turned into a pointer slot of the patch's own
    (filled in by :func:`_pointer_slot_lines`): the same indirection, no COMDAT."""

    def renamed(token: str) -> str:
        if token.startswith(DW_REF_PREFIX):
            return slots.setdefault(token, f"{prefix}{len(slots)}")
        return rename(token)

    return renamed


def _pointer_slot_lines(slots: dict[str, str], rename: Callable[[str], str]) -> list[str]:
    """``.kpatch.data`` words holding the address of each ``DW.ref.X``'s ``X``."""
    if not slots:
        return []
    lines = [f"\t.pushsection\t{KPATCH_SECTIONS[KPATCH_DATA]}", "\t.balign\t8"]
    for reference, label in slots.items():
        lines.extend([f"{label}:", f"\t.quad\t{rename(reference[len(DW_REF_PREFIX):])}"])
    lines.append("\t.popsection")
    return lines


def variable_patch(block: Block, specs: dict[str, str], names: dict[str, str]) -> list[str]:
    """A new variable (or literal) placed in ``.kpatch.data``."""
    rename = _block_renamer(block, names)
    keep = names.get(block.name, block.name) == block.name
    body = _translated_lines(block, specs, rename, keep_attributes=keep, size_labels={}, current=KPATCH_DATA)
    return [f"\t.pushsection\t{KPATCH_SECTIONS[KPATCH_DATA]}", *body, "\t.popsection"]


def render(original: AsmFile, patched: AsmFile, *, changed: dict[str, Block], new_functions: Iterable[Block],
           new_variables: Iterable[Block], names: dict[str, str], to_original: dict[str, str]) -> str:
    """The instrumented assembler text.

    ``changed`` maps an original function name to its patched block, ``names`` maps
    every patched symbol to the name patched code uses for it in the output, and
    ``to_original`` paired patched symbols to the original ones (the patched file's
    header and footer refer to those, as the original's did).
    """
    specs = {**patched.section_specs, **original.section_specs}
    output = Output(specs)
    original_body = _body_blocks(original)
    patched_head, patched_tail = _header_footer(patched)
    strtab_index = 0
    defined = gotpcrel.defined_symbols(original, patched)
    literals = patched.variables()

    def rename_outside(token: str) -> str:
        return to_original.get(token, token)

    for block in patched_head:
        output.copy(block.lines, rename=rename_outside)
    for block in original_body:
        if block.kind == "function" and block.name in changed:
            output.copy(block.lines, before_size={block.name: end_label(block.name)})
            strtab_index += 1
            function = PatchedFunction(changed[block.name], kpatch_name(block.name), block.name)
            output.raw(_patch_lines(function, specs, names, strtab_index, defined, literals, also_in=block))
        else:
            output.copy(block.lines)
    loose = loose_attributes(patched)
    for block in new_functions:
        strtab_index += 1
        output.raw(_kept_attributes(block, names, loose))
        output.raw(_patch_lines(PatchedFunction(block, names[block.name], None), specs, names, strtab_index,
                                defined, literals))
    for block in new_variables:
        output.raw(_kept_attributes(block, names, loose))
        output.raw(variable_patch(block, specs, names))
    for block in patched_tail:
        output.copy(block.lines, rename=rename_outside)
    return "\n".join(output.lines) + "\n"


def _patch_lines(function: PatchedFunction, specs: dict[str, str], names: dict[str, str], strtab_index: int,
                 defined: frozenset[str], literals: dict[str, Block], also_in: Block | None = None) -> list[str]:
    """:func:`function_patch`; for a function in a COMDAT group (its patched block or
    ``also_in``, the original one), in a COMDAT group of its own with its digest recorded
    (:mod:`.comdat`; ``literals``: the patched unit's variables, for the digest)."""
    lines = function_patch(function, specs, names, strtab_index, defined)
    blocks = (function.block,) if also_in is None else (function.block, also_in)
    if not any(comdat.comdat_group(block.section, specs) for block in blocks):
        return lines
    symbol = function.original or function.block.name
    shared = comdat.shared_symbol_lines(function.output_name) if function.output_name != function.block.name else []
    return [*comdat.grouped(lines, comdat.group_name(symbol), KPATCH_SECTIONS.values()), *shared,
            *comdat.digest_lines(symbol, function.block, literals)]


# Attributes a new symbol keeps when gcc wrote them away from its block.
LOOSE_ATTRIBUTES = frozenset((".globl", ".global", ".weak", ".hidden", ".protected", ".internal"))


def loose_attributes(asm: AsmFile) -> dict[str, list[str]]:
    """Linkage attributes written outside any function or variable block, by symbol.

    gcc puts ``.globl x`` / ``.hidden x`` before the string literals a variable's
    initializer refers to, so they land in an "other" block.
    """
    found: dict[str, list[str]] = {}
    for block in asm.blocks:
        if block.kind != "other":
            continue
        for line in block.lines:
            if line.kind is Kind.ATTRIBUTE and line.head in LOOSE_ATTRIBUTES:
                for name in line.args.split(","):
                    found.setdefault(name.strip(), []).append(line.head)
    return found


def _kept_attributes(block: Block, names: dict[str, str], loose: dict[str, list[str]]) -> list[str]:
    """Loose attributes of a new symbol that keeps its name (renamed ones are local)."""
    if names.get(block.name, block.name) != block.name:
        return []
    return [f"\t{head}\t{block.name}" for head in loose.get(block.name, [])]


def _header_footer(asm: AsmFile) -> tuple[list[Block], list[Block]]:
    """The leading and trailing "other" blocks of a file."""
    kinds = [block.kind for block in asm.blocks]
    if all(kind == "other" for kind in kinds):
        return list(asm.blocks), []
    first = min(index for index, kind in enumerate(kinds) if kind != "other")
    last = max(index for index, kind in enumerate(kinds) if kind != "other")
    return list(asm.blocks[:first]), list(asm.blocks[last + 1:])


def _body_blocks(asm: AsmFile) -> list[Block]:
    """The blocks between a file's header and footer."""
    head, tail = _header_footer(asm)
    return list(asm.blocks[len(head):len(asm.blocks) - len(tail)])
