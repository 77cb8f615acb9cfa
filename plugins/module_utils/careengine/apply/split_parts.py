"""The parts gcc split off a function (``foo.cold``), found from the code when there are no
symbols to find them by (a stripped object).

A split-off part has its own FDE in ``.eh_frame``, which survives stripping, and ``foo``
reaches it with a direct ``jmp``/``jcc``. So does a function ``foo`` tail-calls; the two are
told apart by evidence that the target is a function: it is an exported function or the
target of a direct ``call`` somewhere in the object (PLT entries included). Split-off parts
are never called. A target with that evidence still counts as a part if it jumps back into
the middle of ``foo``. Over-counting only makes the safety check stricter, never unsafe.

Pure: the object's code, FDE ranges and function evidence come in as functions, so tests
need no ELF file.
"""

from __future__ import annotations

from collections.abc import Callable

CodeReader = Callable[[int, int], bytes]                  # (vaddr, size) -> bytes ('' if unknown)
FdeRange = Callable[[int], "tuple[int, int] | None"]      # vaddr -> [begin, end) of its FDE
IsFunction = Callable[[int], bool]                        # vaddr -> known to be a function's entry
MAX_PART_SIZE = 1 << 20                                   # a larger FDE is not a split-off part


def jump_targets(code: bytes, address: int) -> list[int]:
    """Targets of the direct jumps (``jmp``, ``jcc``, ``jrcxz``...) in ``code`` at ``address``."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    disassembler = Cs(CS_ARCH_X86, CS_MODE_64)
    targets = []
    for _, _, mnemonic, operands in disassembler.disasm_lite(code, address):
        if mnemonic.startswith("j") and operands.startswith("0x"):
            try:
                targets.append(int(operands, 16))
            except ValueError:
                continue
    return targets


def call_targets(code: bytes, address: int) -> set[int]:
    """Targets of every ``call rel32`` byte pattern (``e8`` + 4 bytes) in ``code`` at
    ``address``. A stray ``e8`` inside another instruction adds a target that is almost never
    a real address, and an extra target only marks something as a function."""
    targets: set[int] = set()
    position = code.find(b"\xe8")
    end = len(code) - 4
    while 0 <= position < end:
        displacement = int.from_bytes(code[position + 1:position + 5], "little", signed=True)
        targets.add(address + position + 5 + displacement)
        position = code.find(b"\xe8", position + 1)
    return targets


def split_parts(start: int, size: int, read_code: CodeReader, fde_range: FdeRange,
                is_function: IsFunction) -> list[tuple[int, int]]:
    """``[begin, end)`` code ranges split off the function at ``[start, start + size)``."""
    body = read_code(start, size)
    if not body:
        return []
    parts: list[tuple[int, int]] = []
    for target in sorted(set(jump_targets(body, start))):
        if start <= target < start + size:
            continue
        covering = fde_range(target)
        if covering is None or covering in parts or covering[0] <= start < covering[1]:
            continue
        begin, end = covering
        if not 0 < end - begin <= MAX_PART_SIZE:
            continue
        if not is_function(target) or any(
                start < back < start + size for back in jump_targets(read_code(begin, end - begin), begin)):
            parts.append(covering)
    return parts
