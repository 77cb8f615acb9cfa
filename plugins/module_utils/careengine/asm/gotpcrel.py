"""Reach data the compilation unit does not define through the GOT (``--force-gotpcrel``).

gcc's ``-fPIE``/``-fno-pie`` code reads an imported variable directly (``movq
stderr(%rip), %rax``): the linker then gives the executable a COPY relocation and puts
the variable in its ``.bss``, which shifts the original ``.bss`` layout when only the
patched link does it. In new and changed function bodies every ``sym+off(%rip)`` operand
whose ``sym`` the unit does not define is therefore rewritten to load the address from
``sym@GOTPCREL(%rip)`` first. The linker relaxes that back to a direct address when the
symbol turns out to be defined in the object (an existing copy, another unit), and the
extraction turns the remaining GOT loads of defined symbols into ``lea``.

One row of :data:`STRATEGIES` per instruction family, one function per strategy:

``load``
    ``movX sym+off(%rip), %r32/%r64`` (mov, movz/movs extensions, lea): the destination's
    full register holds the address, then the instruction reads ``off(%rFULL)``.
``branch``
    ``call/jmp *sym+off(%rip)``: ``%r11`` (clobbered by any call, never an argument).
``push``
    ``pushq sym+off(%rip)``: the value goes through a saved scratch register.
``scratch``
    anything else (stores, read-modify-write, compares, SSE loads, partial-register
    loads): a scratch register saved below the red zone (``leaq -128(%rsp), %rsp`` /
    ``pushq`` ... ``popq`` / ``leaq 128(%rsp), %rsp``; ``lea`` leaves the flags alone).
``refuse``
    ``pop`` into memory: raised as :class:`UnpatchableChange`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import UnpatchableChange
from . import parse
from .normalize import LOCAL_LABEL_PREFIX
from .parse import SECTIONLESS_KINDS, AsmFile, Kind

RED_ZONE = 128
# Symbols that must keep their own addressing whatever the unit defines.
NEVER_THROUGH_GOT = frozenset(("_GLOBAL_OFFSET_TABLE_", "_DYNAMIC"))
# Instruction prefixes gcc writes in front of the mnemonic (``lock addl ...``).
PREFIXES = frozenset(("lock", "rep", "repe", "repz", "repne", "repnz", "notrack", "data16", "addr32", "rex64",
                      "xacquire", "xrelease"))

# A rip-relative memory operand; its displacement must be one symbol plus or minus
# constants (``sym``, ``sym+8``, ``8+sym``, ``sym-4``). A relocation modifier
# (``@GOTPCREL``...) or any other expression is left alone.
RIP_OPERAND_RE = re.compile(r"^(?P<star>\*?)(?P<displacement>[^()]+?)\s*\(%rip\)$")
DISPLACEMENT_TERM_RE = re.compile(r"\s*(?P<sign>[+-]?)\s*(?P<term>[A-Za-z_.$][\w.$]*|0[xX][0-9a-fA-F]+|\d+)\s*")
REGISTER_RE = re.compile(r"%([a-z][a-z0-9]*)")

# General purpose registers: every name -> (64-bit name, width in bits).
_GPR_NAMES = (
    ("rax", "eax", "ax", "al", "ah"), ("rbx", "ebx", "bx", "bl", "bh"), ("rcx", "ecx", "cx", "cl", "ch"),
    ("rdx", "edx", "dx", "dl", "dh"), ("rsi", "esi", "si", "sil"), ("rdi", "edi", "di", "dil"),
    ("rbp", "ebp", "bp", "bpl"), ("rsp", "esp", "sp", "spl"),
    *((f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b") for n in range(8, 16)),
)
_WIDTHS = (64, 32, 16, 8, 8)
GPRS: dict[str, tuple[str, int]] = {name: (names[0], width) for names in _GPR_NAMES
                                    for name, width in zip(names, _WIDTHS, strict=False)}
STACK_POINTER = "rsp"
# Scratch candidates: no instruction uses r8-r11 implicitly (rax, rcx, rdx, rsi, rdi are).
SCRATCH_REGISTERS = ("r11", "r10", "r9", "r8")
BRANCH_REGISTER = "r11"

# Mnemonic -> strategy (the table). Anything not listed is ``scratch``.
STRATEGIES: dict[str, str] = {
    **dict.fromkeys(("mov", "movl", "movq", "movzbl", "movzwl", "movzbq", "movzwq", "movsbl", "movswl",
                     "movsbq", "movswq", "movslq", "movzx", "movsx", "movsxd", "lea", "leal", "leaq"), "load"),
    **dict.fromkeys(("call", "callq", "jmp", "jmpq"), "branch"),
    **dict.fromkeys(("push", "pushq"), "push"),
    **dict.fromkeys(("pop", "popq", "popw", "pushw"), "refuse"),
}


@dataclass(frozen=True)
class Instruction:
    """An instruction split into optional prefix, mnemonic and operands."""

    prefix: str
    mnemonic: str
    operands: tuple[str, ...]

    def text(self, operands: Iterable[str] | None = None) -> tuple[str, str]:
        """(head, args) of the instruction, with ``operands`` replacing its own if given."""
        args = ", ".join(self.operands if operands is None else operands)
        if self.prefix:
            return self.prefix, f"{self.mnemonic}\t{args}".rstrip()
        return self.mnemonic, args


@dataclass(frozen=True)
class Access:
    """The rip-relative operand to rewrite: its index, symbol and constant offset."""

    index: int
    symbol: str
    offset: int
    star: str


Statement = tuple[str, str]      # (head, args) of one output statement


def defined_symbols(*files: AsmFile) -> frozenset[str]:
    """Every symbol the compilation unit defines (labels, common symbols, ``.set`` names)."""
    names: set[str] = set()
    for asm in files:
        for line in asm.lines:
            if line.kind is Kind.LABEL:
                names.add(line.head)
            elif line.kind in SECTIONLESS_KINDS:
                names.add(line.first_arg())
    return frozenset(names)


def split_operands(args: str) -> tuple[str, ...]:
    """Comma-separated operands, commas inside parentheses or braces kept."""
    return tuple(parse.split_top_level(args, "({", ")}"))


def parse_instruction(head: str, args: str) -> Instruction:
    """The instruction of a statement (a ``lock``-like prefix moves into ``prefix``)."""
    if head in PREFIXES and args:
        mnemonic, *rest = args.split(None, 1)
        return Instruction(head, mnemonic, split_operands(rest[0] if rest else ""))
    return Instruction("", head, split_operands(args))


def find_access(instruction: Instruction, defined: frozenset[str]) -> Access | None:
    """The operand that reads or writes a symbol the unit does not define, if any."""
    for index, operand in enumerate(instruction.operands):
        found = RIP_OPERAND_RE.match(operand)
        if not found:
            continue
        symbol_offset = symbol_and_offset(found.group("displacement"))
        if symbol_offset is None:
            return None
        symbol, offset = symbol_offset
        if symbol in defined or symbol.startswith(LOCAL_LABEL_PREFIX) or symbol in NEVER_THROUGH_GOT:
            return None
        return Access(index, symbol, offset, found.group("star"))
    return None


def symbol_and_offset(displacement: str) -> tuple[str, int] | None:
    """``("sym", 8)`` for ``sym+8`` or ``8+sym``; None unless exactly one symbol is added."""
    symbols: list[str] = []
    offset = 0
    position = 0
    while position < len(displacement):
        term = DISPLACEMENT_TERM_RE.match(displacement, position)
        if term is None or term.end() == position or (position and not term.group("sign")):
            return None
        text = term.group("term")
        if text[0].isdigit():
            value = _number(text)
            if value is None:
                return None
            offset += -value if term.group("sign") == "-" else value
        elif term.group("sign") == "-":
            return None
        else:
            symbols.append(text)
        position = term.end()
    return (symbols[0], offset) if len(symbols) == 1 else None


def _number(text: str) -> int | None:
    """A gas integer: ``0x`` hexadecimal, leading ``0`` octal, else decimal."""
    try:
        if text[:2] in ("0x", "0X"):
            return int(text, 16)
        return int(text, 8) if len(text) > 1 and text[0] == "0" else int(text)
    except ValueError:
        return None


def _memory(access: Access, register: str) -> str:
    return f"{access.star}{access.offset if access.offset else ''}(%{register})"


def _got_load(access: Access, register: str) -> Statement:
    return "movq", f"{access.symbol}@GOTPCREL(%rip), %{register}"


def _registers(instruction: Instruction) -> set[str]:
    """Full names of the general purpose registers an instruction names."""
    return {GPRS[name][0] for operand in instruction.operands for name in REGISTER_RE.findall(operand)
            if name in GPRS}


def _replaced(instruction: Instruction, access: Access, register: str) -> Statement:
    operands = list(instruction.operands)
    operands[access.index] = _memory(access, register)
    return instruction.text(operands)


def _load(instruction: Instruction, access: Access, function: str) -> list[Statement]:
    destination = instruction.operands[-1] if access.index != len(instruction.operands) - 1 else ""
    register = GPRS.get(destination[1:]) if destination.startswith("%") else None
    if len(instruction.operands) != 2 or register is None or register[1] < 32 or register[0] == STACK_POINTER:
        return _scratch(instruction, access, function)
    full = register[0]
    if instruction.mnemonic == "leaq" and access.offset == 0 and not instruction.prefix:
        return [_got_load(access, full)]
    return [_got_load(access, full), _replaced(instruction, access, full)]


def _branch(instruction: Instruction, access: Access, function: str) -> list[Statement]:
    if not access.star:
        return _scratch(instruction, access, function)
    return [_got_load(access, BRANCH_REGISTER), _replaced(instruction, access, BRANCH_REGISTER)]


def _free_scratch(instruction: Instruction, access: Access, function: str) -> str:
    used = _registers(instruction)
    if STACK_POINTER in used:
        raise UnpatchableChange(
            f"function {function}: '{' '.join(instruction.text())}' uses the stack pointer and reaches "
            f"{access.symbol}, which this unit does not define; the GOT access around it would move the stack")
    return next(register for register in SCRATCH_REGISTERS if register not in used)


def _scratch(instruction: Instruction, access: Access, function: str) -> list[Statement]:
    register = _free_scratch(instruction, access, function)
    return [
        ("leaq", f"-{RED_ZONE}(%rsp), %rsp"),
        ("pushq", f"%{register}"),
        _got_load(access, register),
        _replaced(instruction, access, register),
        ("popq", f"%{register}"),
        ("leaq", f"{RED_ZONE}(%rsp), %rsp"),
    ]


def _push(instruction: Instruction, access: Access, function: str) -> list[Statement]:
    if len(instruction.operands) != 1:
        return _refuse(instruction, access, function)
    register = SCRATCH_REGISTERS[0]
    # Leaves rsp 8 lower with the value on top, like the push; the scratch is saved
    # below the red zone.
    return [
        ("leaq", f"-{RED_ZONE}(%rsp), %rsp"),
        ("pushq", f"%{register}"),
        _got_load(access, register),
        ("movq", f"{_memory(access, register)}, %{register}"),
        ("movq", f"%{register}, {RED_ZONE}(%rsp)"),
        ("popq", f"%{register}"),
        ("leaq", f"{RED_ZONE - 8}(%rsp), %rsp"),
    ]


def _refuse(instruction: Instruction, access: Access, function: str) -> list[Statement]:
    raise UnpatchableChange(
        f"function {function}: '{' '.join(instruction.text())}' reaches {access.symbol}, which this unit does "
        "not define, in a way that cannot go through the GOT; rewrite it through a pointer")


STRATEGY_FUNCTIONS: dict[str, Callable[[Instruction, Access, str], list[Statement]]] = {
    "load": _load,
    "branch": _branch,
    "push": _push,
    "scratch": _scratch,
    "refuse": _refuse,
}


def rewrite(head: str, args: str, defined: frozenset[str], function: str) -> list[Statement] | None:
    """The statements replacing one instruction, or None if it needs no change.

    ``defined`` are the symbols of the unit (reached directly); ``function`` names the
    function in error messages.
    """
    instruction = parse_instruction(head, args)
    access = find_access(instruction, defined)
    if access is None:
        return None
    strategy = STRATEGIES.get(instruction.mnemonic, "scratch")
    return STRATEGY_FUNCTIONS[strategy](instruction, access, function)
