"""Unwind information for patch code: gcc's ``.cfi_*`` directives as ``.kpatch.eh_frame``.

gas turns ``.cfi_*`` directives into the object's ``.eh_frame``; the linker merges that
with the original code's, and the patch carries only ``.kpatch.*`` sections. So the
directives of a patched body are not given to gas: each one becomes a label at its place
in ``.kpatch.text`` and one DWARF call-frame instruction here, and every
``.cfi_startproc`` .. ``.cfi_endproc`` region becomes a CIE and an FDE written as data in
``.kpatch.eh_frame`` (``.eh_frame`` format, the one libgcc's ``__register_frame_info``
reads). Code positions are label differences (``DW_CFA_advance_loc4``); the FDE's start
is PC-relative (a ``R_X86_64_PC32`` the extraction keeps); the personality routine and
the LSDA (gcc's ``.gcc_except_table`` entry, moved to ``.kpatch.gcc_except_table``) keep
the pointer encodings gcc chose for them.

The extraction ends the section with a zero terminator; the apply step registers it in
the patient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UnpatchableChange
from ..patchfile import SECTION_EH_FRAME, SECTION_EXCEPT_TABLE

KPATCH_EH_FRAME = SECTION_EH_FRAME
KPATCH_EXCEPT_TABLE = SECTION_EXCEPT_TABLE
SECTION_SPECS = {
    KPATCH_EH_FRAME: '.kpatch.eh_frame,"a",@progbits',
    KPATCH_EXCEPT_TABLE: '.kpatch.gcc_except_table,"a",@progbits',
}
EXCEPT_TABLE_PREFIX = ".gcc_except_table"

# x86-64 psABI: code alignment 1, data alignment -8, return address in column 16; the
# CIE's initial rule is "CFA = rsp + 8, return address at CFA - 8".
CODE_ALIGNMENT = 1
DATA_ALIGNMENT = -8
RETURN_ADDRESS_COLUMN = 16
INITIAL_CFA_REGISTER = 7
INITIAL_CFA_OFFSET = 8
DW_CFA_ADVANCE_LOC4 = 0x04
DW_CFA_OFFSET = 0x80
DW_CFA_OFFSET_EXTENDED_SF = 0x11
DW_CFA_RESTORE = 0xC0
DW_CFA_RESTORE_EXTENDED = 0x06
DW_CFA_UNDEFINED = 0x07
DW_CFA_SAME_VALUE = 0x08
DW_CFA_REGISTER = 0x09
DW_CFA_REMEMBER_STATE = 0x0A
DW_CFA_RESTORE_STATE = 0x0B
DW_CFA_DEF_CFA = 0x0C
DW_CFA_DEF_CFA_REGISTER = 0x0D
DW_CFA_DEF_CFA_OFFSET = 0x0E
DW_EH_PE_PCREL_SDATA4 = 0x1B
DW_EH_PE_OMIT = 0xFF
# Pointer size by the low nibble of a DW_EH_PE encoding.
POINTER_DIRECTIVES = {0x00: ".quad", 0x02: ".value", 0x03: ".long", 0x04: ".quad",
                      0x0A: ".value", 0x0B: ".long", 0x0C: ".quad"}
POINTER_SIZES = {".quad": 8, ".value": 2, ".long": 4}
DW_EH_PE_PCREL = 0x10
DW_EH_PE_APPLICATION_MASK = 0x70


def _uleb(value: int) -> list[int]:
    out = []
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return out


def _sleb(value: int) -> list[int]:
    out = []
    while True:
        byte = value & 0x7F
        value >>= 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte if done else byte | 0x80)
        if done:
            return out


def _bytes_line(values: list[int]) -> str:
    return "\t.byte\t" + ", ".join(f"{value:#x}" for value in values)


@dataclass(frozen=True)
class EncodedPointer:
    """A ``.cfi_personality``/``.cfi_lsda`` operand: DW_EH_PE encoding and symbol."""

    encoding: int
    symbol: str

    def directive(self, where: str) -> str:
        """The data directive writing the pointer (``.long sym - .`` for PC-relative ones)."""
        size = POINTER_DIRECTIVES.get(self.encoding & 0x0F)
        application = self.encoding & DW_EH_PE_APPLICATION_MASK
        if size is None or application not in (0, DW_EH_PE_PCREL):
            raise UnpatchableChange(f"{where}: pointer encoding {self.encoding:#x} of {self.symbol} is not supported "
                                    "in patch unwind tables")
        value = f"{self.symbol} - ." if application == DW_EH_PE_PCREL else self.symbol
        return f"\t{size}\t{value}"

    @property
    def size(self) -> int:
        """Bytes the pointer takes."""
        return POINTER_SIZES[POINTER_DIRECTIVES[self.encoding & 0x0F]]


def _pointer(args: str, where: str) -> EncodedPointer | None:
    fields = [part.strip() for part in args.split(",")]
    try:
        encoding = int(fields[0], 0)
    except ValueError:
        raise UnpatchableChange(f"{where}: cannot read CFI pointer {args!r}") from None
    if encoding == DW_EH_PE_OMIT:
        return None
    if len(fields) != 2:
        raise UnpatchableChange(f"{where}: cannot read CFI pointer {args!r}")
    return EncodedPointer(encoding, fields[1])


def _integers(args: str, count: int, where: str, head: str) -> list[int]:
    fields = [part.strip() for part in args.split(",")] if args.strip() else []
    try:
        values = [int(part, 0) for part in fields]
    except ValueError:
        raise UnpatchableChange(f"{where}: {head} {args}: only numeric registers and offsets are supported "
                                "in patch unwind tables") from None
    if len(values) != count:
        raise UnpatchableChange(f"{where}: cannot read {head} {args}")
    return values


@dataclass
class Region:
    """One ``.cfi_startproc`` .. ``.cfi_endproc`` region of a patched body."""

    start: str
    simple: bool = False
    personality: EncodedPointer | None = None
    lsda: EncodedPointer | None = None
    program: list[str] = field(default_factory=list)
    cfa_offsets: list[int] = field(default_factory=lambda: [INITIAL_CFA_OFFSET])
    last_label: str = ""
    end: str = ""


class UnwindCollector:
    """Turns the ``.cfi_*`` lines of patched bodies into code labels and eh_frame records.

    :meth:`directive` is called for every CFI line at its place in ``.kpatch.text`` and
    returns the lines to put there (a label, or nothing); :meth:`records` gives the
    ``.kpatch.eh_frame`` lines of the regions closed so far and forgets them.
    """

    def __init__(self, prefix: str = ".Lkpcfi") -> None:
        self.prefix = prefix
        self.counter = 0
        self.region: Region | None = None
        self.closed: list[Region] = []

    def _label(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter}"

    def directive(self, head: str, args: str, where: str) -> list[str]:
        """Lines for ``.kpatch.text`` in place of the directive ``head args``."""
        if head == ".cfi_startproc":
            if self.region is not None:
                raise UnpatchableChange(f"{where}: .cfi_startproc inside an open CFI region")
            label = self._label()
            self.region = Region(start=label, last_label=label)
            self.region.simple = args.strip() == "simple"
            return [f"{label}:"]
        if self.region is None:
            if head == ".cfi_sections":
                return []
            raise UnpatchableChange(f"{where}: {head} outside a CFI region")
        region = self.region
        if head == ".cfi_endproc":
            label = self._label()
            region.end = label
            self.closed.append(region)
            self.region = None
            return [f"{label}:"]
        if head == ".cfi_personality":
            region.personality = _pointer(args, where)
            return []
        if head == ".cfi_lsda":
            region.lsda = _pointer(args, where)
            return []
        operation = self._operation(region, head, args, where)
        label = self._label()
        region.program.append(f"\t.byte\t{DW_CFA_ADVANCE_LOC4:#x}")
        region.program.append(f"\t.long\t{label} - {region.last_label}")
        region.program.extend(operation)
        region.last_label = label
        return [f"{label}:"]

    @staticmethod
    def _operation(region: Region, head: str, args: str, where: str) -> list[str]:
        """The DW_CFA instruction bytes of one directive (table of the forms gcc writes: _CFA_FORMS)."""
        form = _CFA_FORMS.get(head)
        if form is None:
            raise UnpatchableChange(f"{where}: {head} is not supported in patch unwind tables")
        return form(region.cfa_offsets, head, args, where)

    def open_region(self) -> bool:
        """True while a region is open (a body ended inside ``.cfi_startproc``)."""
        return self.region is not None

    def records(self) -> list[str]:
        """``.kpatch.eh_frame`` lines (one CIE and one FDE per closed region), pushed as a section."""
        if not self.closed:
            return []
        output = [f"\t.pushsection\t{SECTION_SPECS[KPATCH_EH_FRAME]}"]
        for region in self.closed:
            output.extend(_cie_and_fde(region))
        output.append("\t.popsection")
        self.closed = []
        return output


# One form per CFI directive: (the region's CFA offset stack, directive, its arguments,
# where) -> the lines of its DW_CFA instruction. Each may update the offset stack.
def _def_cfa_offset(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    (offset,) = _integers(args, 1, where, head)
    offsets[-1] = offset
    return [_bytes_line([DW_CFA_DEF_CFA_OFFSET, *_uleb(offset)])]


def _adjust_cfa_offset(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    (delta,) = _integers(args, 1, where, head)
    offsets[-1] += delta
    return [_bytes_line([DW_CFA_DEF_CFA_OFFSET, *_uleb(offsets[-1])])]


def _def_cfa(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    register, offset = _integers(args, 2, where, head)
    offsets[-1] = offset
    return [_bytes_line([DW_CFA_DEF_CFA, *_uleb(register), *_uleb(offset)])]


def _def_cfa_register(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    (register,) = _integers(args, 1, where, head)
    return [_bytes_line([DW_CFA_DEF_CFA_REGISTER, *_uleb(register)])]


def _offset(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    register, offset = _integers(args, 2, where, head)
    if offset % DATA_ALIGNMENT:
        raise UnpatchableChange(f"{where}: {head} {args}: offset not a multiple of 8")
    factored = offset // DATA_ALIGNMENT
    if register < 64 and factored >= 0:
        return [_bytes_line([DW_CFA_OFFSET | register, *_uleb(factored)])]
    return [_bytes_line([DW_CFA_OFFSET_EXTENDED_SF, *_uleb(register), *_sleb(factored)])]


def _restore(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    (register,) = _integers(args, 1, where, head)
    if register < 64:
        return [_bytes_line([DW_CFA_RESTORE | register])]
    return [_bytes_line([DW_CFA_RESTORE_EXTENDED, *_uleb(register)])]


def _undefined_or_same_value(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    (register,) = _integers(args, 1, where, head)
    code = DW_CFA_UNDEFINED if head == ".cfi_undefined" else DW_CFA_SAME_VALUE
    return [_bytes_line([code, *_uleb(register)])]


def _register(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    first, second = _integers(args, 2, where, head)
    return [_bytes_line([DW_CFA_REGISTER, *_uleb(first), *_uleb(second)])]


def _remember_state(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    offsets.append(offsets[-1])
    return [_bytes_line([DW_CFA_REMEMBER_STATE])]


def _restore_state(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    if len(offsets) > 1:
        offsets.pop()
    return [_bytes_line([DW_CFA_RESTORE_STATE])]


def _escape(offsets: list[int], head: str, args: str, where: str) -> list[str]:
    return [f"\t.byte\t{args}"]


_CFA_FORMS: dict[str, Callable[[list[int], str, str, str], list[str]]] = {
    ".cfi_def_cfa_offset": _def_cfa_offset,
    ".cfi_adjust_cfa_offset": _adjust_cfa_offset,
    ".cfi_def_cfa": _def_cfa,
    ".cfi_def_cfa_register": _def_cfa_register,
    ".cfi_offset": _offset,
    ".cfi_restore": _restore,
    ".cfi_undefined": _undefined_or_same_value,
    ".cfi_same_value": _undefined_or_same_value,
    ".cfi_register": _register,
    ".cfi_remember_state": _remember_state,
    ".cfi_restore_state": _restore_state,
    ".cfi_escape": _escape,
}


def _cie_and_fde(region: Region) -> list[str]:
    base = region.start
    cie, cie_body, cie_end = f"{base}.cie", f"{base}.cie_body", f"{base}.cie_end"
    fde_body, fde_end = f"{base}.fde_body", f"{base}.fde_end"
    augmentation = "z" + ("P" if region.personality else "") + ("L" if region.lsda else "") + "R"
    augmentation_data: list[str] = []
    augmentation_size = 1
    if region.personality:
        augmentation_data.append(_bytes_line([region.personality.encoding]))
        augmentation_data.append(region.personality.directive(base))
        augmentation_size += 1 + region.personality.size
    if region.lsda:
        augmentation_data.append(_bytes_line([region.lsda.encoding]))
        augmentation_size += 1
    augmentation_data.append(_bytes_line([DW_EH_PE_PCREL_SDATA4]))
    initial = [] if region.simple else [_bytes_line([DW_CFA_DEF_CFA, INITIAL_CFA_REGISTER, INITIAL_CFA_OFFSET,
                                               DW_CFA_OFFSET | RETURN_ADDRESS_COLUMN, 1])]
    lines = [
        "\t.balign\t8",
        f"{cie}:",
        f"\t.long\t{cie_end} - {cie_body}",
        f"{cie_body}:",
        "\t.long\t0",
        _bytes_line([1]),
        f'\t.string\t"{augmentation}"',
        _bytes_line([*_uleb(CODE_ALIGNMENT), *_sleb(DATA_ALIGNMENT), RETURN_ADDRESS_COLUMN]),
        _bytes_line(_uleb(augmentation_size)),
        *augmentation_data,
        *initial,
        "\t.balign\t8, 0",
        f"{cie_end}:",
        f"\t.long\t{fde_end} - {fde_body}",
        f"{fde_body}:",
        f"\t.long\t{fde_body} - {cie}",
        f"\t.long\t{region.start} - .",
        f"\t.long\t{region.end} - {region.start}",
    ]
    if region.lsda:
        lines.append(_bytes_line(_uleb(region.lsda.size)))
        lines.append(region.lsda.directive(base))
    else:
        lines.append(_bytes_line([0]))
    lines.extend(region.program)
    lines.extend(["\t.balign\t8, 0", f"{fde_end}:"])
    return lines
