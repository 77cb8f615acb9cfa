"""Which changes of a C++ unit a live patch may carry today.

The patient's unwinder finds the unwind tables of the objects the dynamic loader
loaded; those of patch code are not registered in the patient yet. An exception thrown
through patched code would therefore end the process (``std::terminate``). So a changed
or new C++ function is accepted only when no exception can pass through it:

* it calls nothing (no ``call``, no tail ``jmp`` to another symbol) and has no
  exception handler or cleanup (``.cfi_personality``/``.cfi_lsda``);
* it is not an inline function or template instance emitted in a COMDAT group (one
  copy per unit that uses it: patching them "once, consistently" across units is not
  done yet);
* the unit adds no data (static initialisation guards, new literals...).

Everything else is refused with :class:`UnpatchableChange`, naming the functions
demangled and the reason.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence

from ..errors import UnpatchableChange
from .normalize import LOCAL_LABEL_PREFIX
from .parse import AsmFile, Block, Kind

HANDLER_DIRECTIVES = frozenset((".cfi_personality", ".cfi_lsda"))
CALLS = ("call",)
JUMPS = ("jmp",)
WHY_NOT_YET = ("only C++ functions that call nothing, handle no exception and are not inline or template "
               "instances can be live-patched today")


def demangle(names: Sequence[str]) -> list[str]:
    """C++ names as people write them (``_Z5checki`` -> ``check(int)``), via binutils' c++filt."""
    if not names:
        return []
    try:
        found = subprocess.run(["c++filt"], input="\n".join(names) + "\n", capture_output=True, text=True,
                               check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return list(names)
    return found if len(found) == len(names) else list(names)


def _target(line) -> str:
    return line.args.split(",")[0].strip()


def exception_hazard(block: Block, asm: AsmFile) -> str | None:
    """Why an exception could pass through (or an issue arise in) ``block``; None when it is safe."""
    spec = asm.section_specs.get(block.section, "")
    if "comdat" in spec or block.section.startswith(".gnu.linkonce"):
        return "is an inline function or template instance emitted in every unit using it (COMDAT)"
    for line in block.lines:
        if line.kind is Kind.CFI and line.head in HANDLER_DIRECTIVES:
            return "has an exception handler or cleanup"
        if line.kind is not Kind.INSTRUCTION:
            continue
        if line.head.startswith(CALLS):
            return f"calls {_target(line)}"
        if line.head.startswith(JUMPS):
            target = _target(line)
            if target.startswith("*") or not (target.startswith(LOCAL_LABEL_PREFIX) or target in block.names):
                return f"jumps to {target}"
    return None


def check_change(patched: AsmFile, changed: Iterable[str], new_functions: Iterable[str],
                 new_variables: Iterable[str], *, source: str = "") -> None:
    """Refuse the C++ change unless every changed or new function is safe (module docstring)."""
    where = f"{source}: " if source else ""
    new_variables = list(new_variables)
    if new_variables:
        raise UnpatchableChange(f"{where}C++ change adds data ({', '.join(demangle(new_variables))}); "
                                "new C++ data cannot be live-patched yet")
    functions = patched.functions()
    reasons = []
    for name in list(changed) + list(new_functions):
        block = functions.get(name)
        hazard = exception_hazard(block, patched) if block is not None else "is not in the patched assembler"
        if hazard:
            reasons.append((name, hazard))
    if reasons:
        names = demangle([name for name, _ in reasons])
        details = "; ".join(f"{pretty} {hazard}" for pretty, (_, hazard) in zip(names, reasons, strict=True))
        raise UnpatchableChange(f"{where}{details}: {WHY_NOT_YET}")
