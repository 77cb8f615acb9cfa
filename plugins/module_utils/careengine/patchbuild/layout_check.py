"""Refuse a patch that changes the layout of a struct, union or class.

Objects of a type live wherever the program put them (heap, stack, other units' data)
and keep the layout they were built with; patched code reading them with another layout
reads the wrong bytes. So a named type that both the original and the patched unit
describe must keep its size and every member's (and base class's) offset and type.

Which types: every named struct, union or class that the unit's debug information
describes in both versions, at namespace or class scope. gcc describes only the types a
unit uses, so that is "the types the unit's code or data use"; narrowing it further to
the changed functions would miss objects that unchanged code hands to patched code.
Types local to a function are left out (no object of them outlives a call). g++
describes a class with virtual functions only in the units that emit its vtable (where
its key function is defined, or every user when it has none): a unit that only uses such
a class cannot tell its layout; the unit that defines it can, when it changes too.

The layouts come from DWARF: both kept assembler files are assembled with ``as`` into
temporary objects and read with pyelftools. Without debug information (a unit built
without ``-g``) there is nothing to compare and the check says so by returning False.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

try:
    from elftools.elf.elffile import ELFFile
except ImportError:     # the compiler wrappers run ``python -S``: add site-packages, now that they are needed
    import site

    site.main()
    from elftools.elf.elffile import ELFFile

from ..errors import BuildError, UnpatchableChange

AGGREGATE_TAGS = {"DW_TAG_structure_type": "struct", "DW_TAG_class_type": "class", "DW_TAG_union_type": "union"}
SCOPE_TAGS = frozenset(("DW_TAG_namespace", *AGGREGATE_TAGS))
# Scopes whose types are local to one call.
LOCAL_SCOPE_TAGS = frozenset(("DW_TAG_subprogram", "DW_TAG_lexical_block", "DW_TAG_inlined_subroutine"))
# How a type modifier is written around the name of the type it modifies.
TYPE_MODIFIERS = {
    "DW_TAG_pointer_type": "{} *", "DW_TAG_reference_type": "{} &", "DW_TAG_rvalue_reference_type": "{} &&",
    "DW_TAG_const_type": "const {}", "DW_TAG_volatile_type": "volatile {}", "DW_TAG_atomic_type": "_Atomic {}",
    "DW_TAG_restrict_type": "{} restrict",
}
TYPE_NAME_DEPTH = 8
DEBUG_INFO_MARK = ".debug_info"
# x86-64 relocation type -> bytes written, for the absolute ones .debug_info uses.
ABSOLUTE_RELOCATIONS = {1: 8, 10: 4, 11: 4}        # R_X86_64_64, R_X86_64_32, R_X86_64_32S
RELA = struct.Struct("<QQq")                          # Elf64_Rela: r_offset, r_info, r_addend
SYMBOL = struct.Struct("<IBBHQQ")                     # Elf64_Sym: name, info, other, shndx, value, size


@dataclass(frozen=True)
class Member:
    """A data member or base class: where it is and what it holds."""

    name: str
    offset: int | None      # bytes; None for a member without a location (a union's)
    bit_offset: int | None
    type_name: str


@dataclass(frozen=True)
class Layout:
    """The size and members of one struct, union or class."""

    kind: str
    size: int
    members: tuple[Member, ...]


def _attribute(die, name: str):
    found = die.attributes.get(name)
    return found.value if found is not None else None


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def type_name(die, depth: int = 0) -> str:
    """A readable name of the type ``die`` (``const char *``, ``Tally``, ``int[4]``)."""
    if die is None:
        return "void"
    name = _attribute(die, "DW_AT_name")
    if name is not None and die.tag not in TYPE_MODIFIERS:
        return _text(name)
    if depth >= TYPE_NAME_DEPTH:
        return "..."
    inner = type_name(die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None,
                      depth + 1)
    if die.tag in TYPE_MODIFIERS:
        return TYPE_MODIFIERS[die.tag].format(inner)
    if die.tag == "DW_TAG_array_type":
        bounds = [_attribute(child, "DW_AT_upper_bound") for child in die.iter_children()
                  if child.tag == "DW_TAG_subrange_type"]
        return inner + "".join(f"[{bound + 1}]" if isinstance(bound, int) else "[]" for bound in bounds)
    return f"<{die.tag.removeprefix('DW_TAG_')}>"


def _qualified_name(die) -> str | None:
    """``geo::Box`` for a named type at namespace or class scope; None for local or anonymous ones."""
    name = _attribute(die, "DW_AT_name")
    if name is None:
        return None
    parts = [_text(name)]
    parent = die.get_parent()
    while parent is not None and parent.tag != "DW_TAG_compile_unit":
        if parent.tag in LOCAL_SCOPE_TAGS:
            return None
        if parent.tag in SCOPE_TAGS:
            parent_name = _attribute(parent, "DW_AT_name")
            parts.append(_text(parent_name) if parent_name is not None else "(anonymous)")
        parent = parent.get_parent()
    return "::".join(reversed(parts))


def _member(die) -> Member | None:
    """One data member or base class; None for static members (no place in the object)."""
    if die.tag not in ("DW_TAG_member", "DW_TAG_inheritance") or "DW_AT_declaration" in die.attributes:
        return None
    member_type = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
    if die.tag == "DW_TAG_inheritance":
        name = f"base {type_name(member_type)}"
    else:
        name = _text(_attribute(die, "DW_AT_name") or "(anonymous)")
    offset = _attribute(die, "DW_AT_data_member_location")
    return Member(name, offset if isinstance(offset, int) else None, _attribute(die, "DW_AT_data_bit_offset"),
                  type_name(member_type))


def _is_definition(die) -> bool:
    return die.tag in AGGREGATE_TAGS and "DW_AT_declaration" not in die.attributes \
        and "DW_AT_byte_size" in die.attributes


def _scope_types(scope) -> Iterator[tuple]:
    """(naming DIE, struct/union/class DIE) in ``scope`` and the namespaces and classes in it.

    A type is named by itself, or by a typedef when it has no name of its own (C's
    ``typedef struct {...} name;``). Functions are not entered: their types are local,
    and they hold most of the DIEs (pyelftools skips them by their sibling links).
    """
    for die in scope.iter_children():
        if die.tag in AGGREGATE_TAGS:
            if _is_definition(die) and "DW_AT_name" in die.attributes:
                yield die, die
            yield from _scope_types(die)
        elif die.tag == "DW_TAG_namespace":
            yield from _scope_types(die)
        elif die.tag == "DW_TAG_typedef" and "DW_AT_type" in die.attributes:
            named = die.get_DIE_from_attribute("DW_AT_type")
            if _is_definition(named) and "DW_AT_name" not in named.attributes:
                yield die, named


def _aggregates(elf: ELFFile) -> Iterator[tuple]:
    for unit in elf.get_dwarf_info(relocate_dwarf_sections=False).iter_CUs():
        yield from _scope_types(unit.get_top_DIE())


def _relocated_debug_info(image: bytes) -> bytes:
    """The object file with ``.debug_info``'s absolute relocations applied in place.

    In an object from ``as`` every string and abbreviation offset of ``.debug_info`` is a
    RELA relocation (the bytes hold 0). pyelftools can apply them, at one parse of a
    symbol per relocation (seconds for a large unit); here it is one pass of ``struct``.
    """
    elf = ELFFile(io.BytesIO(image))
    relocations = elf.get_section_by_name(".rela" + DEBUG_INFO_MARK)
    target = elf.get_section_by_name(DEBUG_INFO_MARK)
    if relocations is None or target is None:
        return image
    symbol_values = [value for *_, value, _ in SYMBOL.iter_unpack(elf.get_section(relocations["sh_link"]).data())]
    patched = bytearray(image)
    base = target["sh_offset"]
    for offset, info, addend in RELA.iter_unpack(relocations.data()):
        width = ABSOLUTE_RELOCATIONS.get(info & 0xFFFFFFFF)
        if width is not None:
            value = (symbol_values[info >> 32] + addend) & ((1 << (8 * width)) - 1)
            patched[base + offset:base + offset + width] = value.to_bytes(width, "little")
    return bytes(patched)


def read_layouts(stream: BinaryIO) -> dict[str, set[Layout]]:
    """Qualified type name -> its layouts (normally one) in an object file's DWARF."""
    elf = ELFFile(io.BytesIO(_relocated_debug_info(stream.read())))
    if not elf.has_dwarf_info():
        return {}
    layouts: dict[str, set[Layout]] = {}
    for naming, die in _aggregates(elf):
        name = _qualified_name(naming)
        if name is None:
            continue
        members = tuple(member for child in die.iter_children() if (member := _member(child)) is not None)
        layouts.setdefault(name, set()).add(Layout(AGGREGATE_TAGS[die.tag], die.attributes["DW_AT_byte_size"].value,
                                                   members))
    return layouts


def _place(member: Member) -> str:
    where = str(member.offset) if member.offset is not None else "?"
    return f"{where}+{member.bit_offset}b" if member.bit_offset is not None else where


def _member_changes(before: Layout, after: Layout) -> list[str]:
    old = {member.name: member for member in before.members}
    new = {member.name: member for member in after.members}
    changes = [f"member `{name}` removed" for name in old if name not in new]
    for name, member in new.items():
        previous = old.get(name)
        if previous is None:
            changes.append(f"member `{name}` added at {_place(member)}")
            continue
        if (previous.offset, previous.bit_offset) != (member.offset, member.bit_offset):
            changes.append(f"member `{name}` moved {_place(previous)} -> {_place(member)}")
        if previous.type_name != member.type_name:
            changes.append(f"member `{name}` type {previous.type_name} -> {member.type_name}")
    if not changes and [m.name for m in before.members] != [m.name for m in after.members]:
        changes.append("members reordered")
    return changes


def describe_change(name: str, before: Layout, after: Layout) -> str:
    """``the layout of struct Tally changed (size 16 -> 24; member `extra` added at 16)``."""
    changes = [f"size {before.size} -> {after.size}"] if before.size != after.size else []
    if before.kind != after.kind:
        changes.append(f"{before.kind} -> {after.kind}")
    changes += _member_changes(before, after)
    return f"the layout of {after.kind} {name} changed ({'; '.join(changes) or 'same members, other bytes'})"


def layout_changes(before: dict[str, set[Layout]], after: dict[str, set[Layout]]) -> list[str]:
    """One description per type described in both whose layouts differ, by name."""
    found = []
    for name in sorted(set(before) & set(after)):
        if before[name] != after[name]:
            old = sorted(before[name] - after[name], key=repr) or sorted(before[name], key=repr)
            new = sorted(after[name] - before[name], key=repr) or sorted(after[name], key=repr)
            found.append(describe_change(name, old[0], new[0]))
    return found


def _assembled_layouts(asm_path: str, directory: str) -> dict[str, set[Layout]]:
    output = os.path.join(directory, os.path.basename(asm_path) + ".o")
    assembled = subprocess.run(["as", "--64", "-o", output, asm_path], capture_output=True, text=True,
                               check=False)
    if assembled.returncode:
        first = (assembled.stderr.strip().splitlines() or ["no message"])[0]
        raise BuildError(f"cannot assemble {asm_path} to read its types: {first}")
    with open(output, "rb") as stream:
        return read_layouts(stream)


def has_debug_info(asm_text: str) -> bool:
    """True if gcc wrote DWARF into this assembler (the unit was built with ``-g``)."""
    return DEBUG_INFO_MARK in asm_text


def check_layouts(original_asm: str, patched_asm: str) -> bool:
    """Refuse (:class:`UnpatchableChange`) if a type's layout differs between the two
    assembler files; False when they carry no debug information to compare."""
    with open(original_asm, encoding="utf-8", errors="surrogateescape") as stream:
        original_text = stream.read()
    with open(patched_asm, encoding="utf-8", errors="surrogateescape") as stream:
        patched_text = stream.read()
    if not (has_debug_info(original_text) and has_debug_info(patched_text)):
        return False
    with tempfile.TemporaryDirectory(prefix="libcare-layout-") as directory:
        changes = layout_changes(_assembled_layouts(original_asm, directory),
                                 _assembled_layouts(patched_asm, directory))
    if changes:
        raise UnpatchableChange(f"{'; '.join(changes)}: objects that exist keep the old layout, so this cannot "
                                "be live-patched")
    return True
