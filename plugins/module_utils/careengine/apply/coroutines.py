"""Can a process switch stacks? Then it may keep suspended stacks no thread runs on.

Three signs, each cheap and cached per build-id (decided before the patient is stopped):

- an object imports ``swapcontext``/``setcontext``/``makecontext`` (its ``.dynstr`` names
  them; glibc itself, which defines them, does not count);
- it is, or needs, a known coroutine library (libco, Boost.Context/Coroutine, libtask,
  libaco, libdill/libmill, GNU Pth, libcoro);
- its own code loads ``%rsp`` from memory through a pointer (``mov disp(%reg), %rsp`` with
  a base other than ``%rsp``/``%rbp``, found with capstone inside functions the CFI
  delimits): a hand-written context switch. Frame code restores ``%rsp`` from the frame
  or a register, never like this. glibc and the dynamic loader are not scanned (their
  ``setcontext``/``longjmp`` only run when called, which the first sign catches).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone.x86 import X86_OP_MEM, X86_OP_REG, X86_REG_RBP, X86_REG_RIP, X86_REG_RSP

from ..process import MappedObject
from .object_files import ObjectFile

CONTEXT_FUNCTIONS = (b"swapcontext", b"setcontext", b"makecontext")
COROUTINE_LIBRARIES = re.compile(r"^lib(co|boost_context|boost_coroutine|task|aco|dill|mill|pth|coro)[.-]")
SYSTEM_LIBRARIES = re.compile(r"^(libc|ld-linux-x86-64|libpthread|libdl|librt|libm)\.so")
# REX.W (no REX.R: the destination is %rsp) 8B /r with reg = 100 and a memory operand.
_MOV_TO_RSP = re.compile(rb"[\x48\x49\x4a\x4b]\x8b[\x20-\x27\x60-\x67\xa0-\xa7]", re.DOTALL)


@dataclass(frozen=True)
class StackSwitching:
    """Why a process can run on stacks other than its threads' own (empty: it cannot)."""

    reasons: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.reasons)

    def describe(self) -> str:
        return "; ".join(self.reasons)


_by_build_id: dict[str, tuple[str, ...]] = {}


def object_reasons(mapped: MappedObject, parsed: ObjectFile) -> tuple[str, ...]:
    """The signs of stack switching in one object (cached per build-id)."""
    key = mapped.build_id or f"{mapped.path}@{mapped.start:#x}"
    if key in _by_build_id:
        return _by_build_id[key]
    name = parsed.soname or mapped.path.rsplit("/", 1)[-1]
    reasons: list[str] = []
    if not SYSTEM_LIBRARIES.match(name):
        dynstr = parsed.elf.get_section_by_name(".dynstr")
        strings = dynstr.data() if dynstr is not None and dynstr["sh_type"] != "SHT_NOBITS" else b""
        used = [f.decode() for f in CONTEXT_FUNCTIONS if b"\0" + f + b"\0" in strings]
        if used:
            reasons.append(f"{name} uses {', '.join(used)}")
        libraries = [needed for needed in parsed.needed if COROUTINE_LIBRARIES.match(needed)]
        if COROUTINE_LIBRARIES.match(name):
            libraries.insert(0, name)
        if libraries:
            reasons.append(f"{name} is or links the coroutine library {libraries[0]}")
        switch = find_stack_switch(parsed)
        if switch is not None:
            reasons.append(f"{name} loads %rsp from memory at {switch[0]:#x} ({switch[1]}): a hand-made stack switch")
    _by_build_id[key] = tuple(reasons)
    return _by_build_id[key]


def find_stack_switch(parsed: ObjectFile) -> tuple[int, str] | None:
    """(link address, instruction) of the first ``mov disp(%reg), %rsp`` through a
    pointer in the object's code, confirmed on an instruction boundary; None if none."""
    disassembler = Cs(CS_ARCH_X86, CS_MODE_64)
    disassembler.detail = True
    for segment in parsed.elf.iter_segments():
        if segment["p_type"] != "PT_LOAD" or not segment["p_flags"] & 1:
            continue
        start, code = segment["p_vaddr"], segment.data()
        for match in _MOV_TO_RSP.finditer(code):
            address = start + match.start()
            function = parsed.fde_range(address)
            if function is None:
                continue
            begin, end = function
            body = parsed.code_at(begin, end - begin)
            for insn in disassembler.disasm(body, begin):
                if insn.address > address:
                    break
                if insn.address == address and _loads_rsp_through_pointer(insn):
                    return address, f"{insn.mnemonic} {insn.op_str}"
    return None


def _loads_rsp_through_pointer(insn) -> bool:
    if insn.mnemonic != "mov" or len(insn.operands) != 2:
        return False
    destination, source = insn.operands
    if destination.type != X86_OP_REG or destination.reg != X86_REG_RSP or source.type != X86_OP_MEM:
        return False
    return source.mem.base not in (X86_REG_RSP, X86_REG_RBP, X86_REG_RIP, 0)


def stack_switching(objects: list[MappedObject], files: dict[int, ObjectFile]) -> StackSwitching:
    """Every sign of stack switching among the process's mapped objects."""
    reasons: list[str] = []
    for mapped in objects:
        parsed = files.get(mapped.start)
        if parsed is None:
            continue
        try:
            reasons.extend(object_reasons(mapped, parsed))
        except Exception as exc:  # noqa: BLE001 - an object we cannot read is a sign we cannot rule out
            reasons.append(f"{mapped.path} cannot be examined ({type(exc).__name__})")
    return StackSwitching(tuple(reasons))
