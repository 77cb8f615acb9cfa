"""split_parts: finding foo.cold without symbols, from jumps, CFI ranges and call targets."""

from __future__ import annotations

import struct

from plugins.module_utils.careengine.apply.split_parts import call_targets, jump_targets, split_parts

FOO, COLD, TAIL, FAR = 0x1000, 0x2000, 0x3000, 0x4000
RET = b"\xc3"


def jcc(site: int, target: int) -> bytes:
    """``jne rel32`` at ``site``."""
    return b"\x0f\x85" + struct.pack("<i", target - (site + 6))


def jmp(site: int, target: int) -> bytes:
    """``jmp rel32`` at ``site``."""
    return b"\xe9" + struct.pack("<i", target - (site + 5))


def program(cold_jumps_back: bool) -> dict[int, bytes]:
    """foo: jne COLD; jne FOO+4 (inside); jmp TAIL (a tail call); ret.
    COLD: ret, or jmp back into the middle of foo. TAIL: ret."""
    foo = jcc(FOO, COLD) + jcc(FOO + 6, FOO + 4) + jmp(FOO + 12, TAIL) + RET
    cold = jmp(COLD, FOO + 12) if cold_jumps_back else RET
    return {FOO: foo, COLD: cold, TAIL: RET}


def reader(code: dict[int, bytes]):
    def read(vaddr: int, size: int) -> bytes:
        return code.get(vaddr, b"")[:size]
    return read


FDES = {FOO: (FOO, FOO + 18), COLD: (COLD, COLD + 16), TAIL: (TAIL, TAIL + 16)}


def fde_range(vaddr: int):
    return next((r for r in FDES.values() if r[0] <= vaddr < r[1]), None)


def test_jump_targets_are_direct_jumps_only() -> None:
    code = program(False)[FOO]
    assert jump_targets(code, FOO) == [COLD, FOO + 4, TAIL]
    assert jump_targets(b"\xff\xe0", FOO) == []                 # jmp *%rax


def test_call_targets() -> None:
    code = b"\x90" + b"\xe8" + struct.pack("<i", TAIL - (FOO + 6)) + RET
    assert TAIL in call_targets(code, FOO)


def test_a_jumped_to_range_that_is_no_function_is_a_split_part() -> None:
    code = program(False)
    parts = split_parts(FOO, 18, reader(code), fde_range, lambda vaddr: vaddr == TAIL)
    assert parts == [(COLD, COLD + 16)]


def test_a_called_function_is_not_a_part_unless_it_jumps_back() -> None:
    assert split_parts(FOO, 18, reader(program(False)), fde_range, lambda vaddr: True) == []
    assert split_parts(FOO, 18, reader(program(True)), fde_range, lambda vaddr: True) == [(COLD, COLD + 16)]


def test_no_cfi_or_no_code_gives_nothing() -> None:
    assert split_parts(FOO, 18, reader(program(False)), lambda vaddr: None, lambda vaddr: False) == []
    assert split_parts(FAR, 18, reader(program(False)), fde_range, lambda vaddr: False) == []
