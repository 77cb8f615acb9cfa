"""Every field of a patch, checked before any process is touched.

Two passes, both pure reads of files:

- :func:`check_image`: the patch against itself. Every section with contents lies inside
  the ELF image and no two overlap; every relocation names a known type and symbol and its
  place lies inside its own section (not merely inside the image); relocations of
  ``.kpatch.info`` only fill an entry's ``daddr``, ``saddr`` or ``symstr`` field; each
  entry's new code (``saddr``, ``slen``) lies inside an executable section of the patch and
  its name (``symstr``) inside ``.kpatch.strtab``; a replaced function is at least as long
  as the jump written over it.
- :func:`check_target`: the patch against the object it is for. The object's file has the
  header's build-id; each replaced function's address and size equal those of the symbol
  of that name in the object's ``.symtab``/``.dynsym`` (without one: the address starts an
  FDE of ``.eh_frame``); its first bytes are in an executable segment and decode to whole
  instructions that cover the 5-byte jump.

A failed check raises with one line naming the field and its value.
"""

from __future__ import annotations

import weakref

from ..errors import BuildIdMismatch, PatchFormatError
from ..patchfile import INFO_ENTRY_SIZE, INFO_FIELD_OFFSETS, JUMP_SIZE, SECTION_STRTAB
from .image import SHN_ABS, STT_SECTION, ImageRelocation, ImageSection, PatchImage
from .relocate import R_X86_64, RELOCATION_RECIPES_X64, relocation_name

# The fields of a .kpatch.info entry a relocation may fill, by offset in the entry.
_RELOCATED_INFO_FIELDS = {INFO_FIELD_OFFSETS[name]: name for name in ("daddr", "saddr", "symstr")}
_MAX_INSTRUCTION = 15
# Parsed target object (alive while the engine caches it) -> the patches that passed against it.
_validated: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_VALIDATED_PER_TARGET = 64


class InvalidPatch(PatchFormatError):
    """A field of the patch contradicts the rest of the patch."""


class TargetMismatch(BuildIdMismatch):
    """The patch does not fit the object it would be applied to."""


def _where(image: PatchImage) -> str:
    return f"patch for {image.build_id}"


def _section(image: PatchImage, index: int) -> ImageSection | None:
    return image.sections[index] if 0 <= index < len(image.sections) else None


def check_image(image: PatchImage) -> None:
    """The patch against itself (see the module docstring); raise :class:`InvalidPatch`."""
    _check_sections(image)
    for number, relocation in enumerate(image.relocations):
        _check_relocation(image, number, relocation)
    info = _info_section(image)
    if image.info_count * INFO_ENTRY_SIZE > info.size:
        raise InvalidPatch(f"{_where(image)}: .kpatch.info holds {image.info_count} entries of {INFO_ENTRY_SIZE} "
                           f"bytes but its size is {info.size}")
    for index in range(image.info_count):
        _check_entry(image, info, index)


def _check_sections(image: PatchImage) -> None:
    elf_size = len(image.patch.elf_image)
    spans = []
    for section in image.sections:
        if section.nobits or not section.index or not section.size:
            continue
        if section.sh_offset < 0 or section.sh_offset + section.size > elf_size:
            raise InvalidPatch(f"{_where(image)}: section {section.name or section.index} at file offset "
                               f"{section.sh_offset:#x} size {section.size:#x} ends past the ELF image "
                               f"({elf_size:#x} bytes)")
        spans.append((section.sh_offset, section.sh_offset + section.size, section.name or str(section.index)))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:], strict=False):
        if start < end and (name.startswith(".kpatch") or other.startswith(".kpatch")):
            raise InvalidPatch(f"{_where(image)}: sections {name} and {other} overlap at file offset {start:#x}")


def _check_relocation(image: PatchImage, number: int, relocation: ImageRelocation) -> None:
    section = _section(image, relocation.section)
    name = section.name if section is not None else f"section {relocation.section}"
    what = f"{_where(image)}: relocation {number} ({relocation_name(relocation.rtype)} at {name}+{relocation.offset:#x})"
    recipe = RELOCATION_RECIPES_X64.get(relocation.rtype)
    if recipe is None:
        raise InvalidPatch(f"{what}: unsupported relocation type {relocation.rtype}")
    if not 0 <= relocation.symbol < len(image.symbols):
        raise InvalidPatch(f"{what}: symbol index {relocation.symbol} is outside the symbol table "
                           f"({len(image.symbols)} symbols)")
    if section is None or section.nobits:
        raise InvalidPatch(f"{what}: relocates a section without contents")
    if relocation.offset < 0 or relocation.offset + recipe.size > section.size:
        raise InvalidPatch(f"{what}: offset {relocation.offset:#x} + {recipe.size} lies outside {name} "
                           f"(size {section.size:#x})")
    symbol = image.symbols[relocation.symbol]
    if symbol.shndx not in (0, SHN_ABS) and symbol.shndx < 0xFF00 and _section(image, symbol.shndx) is None:
        raise InvalidPatch(f"{what}: symbol {symbol.name or relocation.symbol} is in section {symbol.shndx}, "
                           f"which does not exist")


def _info_section(image: PatchImage) -> ImageSection:
    for section in image.sections:
        if section.name == ".kpatch.info" and not section.nobits:
            return section
    raise InvalidPatch(f"{_where(image)} has no .kpatch.info section")


def _info_relocations(image: PatchImage, info: ImageSection) -> dict[int, ImageRelocation]:
    """Relocations of ``.kpatch.info`` by offset; one that is not a whole 64-bit field
    ``daddr``/``saddr``/``symstr`` of an entry is refused."""
    found: dict[int, ImageRelocation] = {}
    for relocation in image.relocations:
        if relocation.section != info.index or relocation.rtype == R_X86_64["NONE"]:
            continue
        entry, field_offset = divmod(relocation.offset, INFO_ENTRY_SIZE)
        field = _RELOCATED_INFO_FIELDS.get(field_offset)
        if field is None or relocation.rtype != R_X86_64["64"] or entry >= image.info_count:
            raise InvalidPatch(f"{_where(image)}: relocation {relocation_name(relocation.rtype)} at .kpatch.info+"
                               f"{relocation.offset:#x} overlaps entry {entry} outside its daddr/saddr/symstr fields")
        if relocation.offset in found:
            raise InvalidPatch(f"{_where(image)}: .kpatch.info+{relocation.offset:#x} is relocated twice")
        found[relocation.offset] = relocation
    return found


def _target_offset(image: PatchImage, relocation: ImageRelocation) -> tuple[ImageSection | None, int]:
    """The section a relocation points into and the offset in it (symbol value + addend)."""
    symbol = image.symbols[relocation.symbol]
    value = 0 if symbol.sym_type == STT_SECTION else symbol.value
    return _section(image, symbol.shndx), value + relocation.addend


def _check_entry(image: PatchImage, info: ImageSection, index: int) -> None:
    raw = image.patch.elf_image[info.sh_offset + index * INFO_ENTRY_SIZE:]
    slen = int.from_bytes(raw[20:24], "little")
    dlen = int.from_bytes(raw[16:20], "little")
    relocations = _info_relocations(image, info)
    base = index * INFO_ENTRY_SIZE
    name = image.entry_names[index] if index < len(image.entry_names) else f"entry {index}"
    what = f"{_where(image)}: .kpatch.info entry {index} ({name})"
    saddr = relocations.get(base + INFO_FIELD_OFFSETS["saddr"])
    if saddr is None:
        raise InvalidPatch(f"{what}: saddr is not relocated to the new code")
    section, offset = _target_offset(image, saddr)
    if section is None or section.nobits or not section.name.startswith(".kpatch"):
        raise InvalidPatch(f"{what}: saddr points into {section.name if section else 'no section'}, not into "
                           "the patch's text")
    if not section.executable or section.writable:
        raise InvalidPatch(f"{what}: saddr {section.name}+{offset:#x} is not in an executable section")
    if slen == 0 or offset < 0 or offset + slen > section.size:
        raise InvalidPatch(f"{what}: saddr {section.name}+{offset:#x} with slen {slen} lies outside "
                           f"{section.name} (size {section.size:#x})")
    symstr = relocations.get(base + INFO_FIELD_OFFSETS["symstr"])
    if symstr is not None:
        strtab, position = _target_offset(image, symstr)
        if strtab is None or strtab.name != SECTION_STRTAB or strtab.nobits or not 0 <= position < strtab.size:
            raise InvalidPatch(f"{what}: symstr {position:#x} is not an offset into {SECTION_STRTAB}")
        text = image.patch.elf_image[strtab.sh_offset + position:strtab.sh_offset + strtab.size]
        if b"\0" not in text:
            raise InvalidPatch(f"{what}: symstr {position:#x} names a string that runs past {SECTION_STRTAB}")
    if not image.entry_is_new[index] and dlen < JUMP_SIZE:
        raise InvalidPatch(f"{what}: dlen {dlen} is shorter than the {JUMP_SIZE}-byte jump written over it")


def replaced_vaddrs(image: PatchImage) -> list[tuple[int, str, int, int]]:
    """(entry index, name, link address in the target, dlen) of each replaced function."""
    info = _info_section(image)
    relocations = _info_relocations(image, info)
    found = []
    for index in range(image.info_count):
        if image.entry_is_new[index]:
            continue
        raw = image.patch.elf_image[info.sh_offset + index * INFO_ENTRY_SIZE:]
        dlen = int.from_bytes(raw[16:20], "little")
        name = image.entry_names[index]
        daddr = relocations.get(index * INFO_ENTRY_SIZE + INFO_FIELD_OFFSETS["daddr"])
        if daddr is None:
            raise InvalidPatch(f"{_where(image)}: .kpatch.info entry {index} ({name}): daddr is not relocated "
                               "to a function of the target")
        section, offset = _target_offset(image, daddr)
        if section is None or not section.nobits or section.name.startswith(".kpatch"):
            raise InvalidPatch(f"{_where(image)}: .kpatch.info entry {index} ({name}): daddr points into "
                               f"{section.name if section else 'no section'}, not into the target's code")
        found.append((index, name, section.sh_addr + offset, dlen))
    return found


def check_target(image: PatchImage, target, path: str) -> None:
    """The patch against the target object ``target`` (an :class:`.objects.ObjectFile`)
    mapped from ``path``; raise :class:`TargetMismatch`."""
    from ..elf import build_id_from_notes

    file_build_id = None
    note = target.elf.get_section_by_name(".note.gnu.build-id")   # by pyelftools' name map, built once
    if note is not None and note["sh_type"] == "SHT_NOTE":
        file_build_id = build_id_from_notes(note.data())
    if file_build_id is not None and file_build_id != image.build_id:
        raise TargetMismatch(f"{_where(image)}: header build-id {image.build_id} is not the build-id "
                             f"{file_build_id} of {path}")
    for index, name, vaddr, dlen in replaced_vaddrs(image):
        what = f"{_where(image)}: .kpatch.info entry {index} ({name}): daddr {vaddr:#x}"
        symbols = [s for s in target.symbols_named(name) if s.size] if name else []
        if symbols:
            if not any(s.vaddr == vaddr and s.size == dlen for s in symbols):
                listed = ", ".join(f"{s.vaddr:#x} size {s.size}" for s in symbols[:3])
                raise TargetMismatch(f"{what} dlen {dlen} is not the symbol {name} of {path} ({listed})")
        else:
            fde = target.fde_range(vaddr)
            if fde is None or fde[0] != vaddr:
                raise TargetMismatch(f"{what}: {path} has no symbol {name!r} and no FDE starts there")
        code = target.code_at(vaddr, min(dlen, _MAX_INSTRUCTION + JUMP_SIZE))
        if len(code) < JUMP_SIZE:
            raise TargetMismatch(f"{what} is not in an executable segment of {path}")
        covered = _whole_instructions(code, vaddr)
        if covered < JUMP_SIZE:
            raise TargetMismatch(f"{what}: its first bytes {code[:8].hex()} do not decode to whole instructions "
                                 f"covering the {JUMP_SIZE}-byte jump")


def _whole_instructions(code: bytes, address: int) -> int:
    """Bytes of ``code`` covered by whole instructions from its start, up to the jump's size."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    covered = 0
    for _, size, _, _ in Cs(CS_ARCH_X86, CS_MODE_64).disasm_lite(code, address):
        covered += size
        if covered >= JUMP_SIZE:
            break
    return covered if covered <= len(code) else 0


def validate(image: PatchImage, target, path: str) -> None:
    """Both passes: the patch against itself, then against the target object; once per
    patch (its header and bytes) and parsed target: both are facts of files, and the
    resident service validates the same pair on every request otherwise."""
    try:
        passed = _validated.setdefault(target, set())
    except TypeError:                         # a target that cannot be weakly referenced: no memo
        passed = set()
    if image.patch in passed:
        return
    check_image(image)
    check_target(image, target, path)
    if len(passed) >= _VALIDATED_PER_TARGET:
        passed.clear()
    passed.add(image.patch)
