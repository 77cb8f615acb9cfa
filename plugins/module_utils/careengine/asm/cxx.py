"""Which changes of a C++ unit a live patch may carry.

Changed and new C++ functions may call others, throw, and catch: the patch carries their
unwind records and exception tables (:mod:`.eh_frame`) and the apply step registers
them in the patient's unwinder, so an exception thrown through patched code is caught
where it was before. Refused, with :class:`UnpatchableChange` naming the functions or
classes demangled and the reason:

* an inline function or template instance emitted in a COMDAT group (one copy per unit
  that uses it: patching them "once, consistently" across units is not done yet);
* a unit that adds data (static initialisation guards, new literals of ``static``
  objects...);
* a changed vtable, typeinfo or VTT of a class (a changed set of virtual functions or
  bases): objects that exist keep pointing at the old one (:func:`describe_class_data`).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence

from ..errors import UnpatchableChange
from .parse import AsmFile, Block

WHY_NOT_YET = "inline functions and template instances (COMDAT) cannot be live-patched yet"
# Class data g++ emits, by mangled prefix (Itanium C++ ABI).
CLASS_DATA = {"_ZTV": "vtable", "_ZTI": "typeinfo", "_ZTS": "typeinfo name", "_ZTT": "VTT"}
CLASS_DATA_RE = re.compile(r"\b(_ZT[VIST]\w+)")


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


def refusal_reason(block: Block, asm: AsmFile) -> str | None:
    """Why ``block`` cannot be patched as a C++ function; None when it can."""
    spec = asm.section_specs.get(block.section, "")
    if "comdat" in spec or block.section.startswith(".gnu.linkonce"):
        return "is an inline function or template instance emitted in every unit using it (COMDAT)"
    return None


def describe_class_data(message: str) -> str | None:
    """A refusal about changed data, reworded when the data is a class's vtable,
    typeinfo or VTT (``vtable for Square changed``); None when it is not."""
    found = CLASS_DATA_RE.search(message)
    if not found:
        return None
    mangled = found.group(1)
    what = CLASS_DATA[mangled[:4]]
    class_name = demangle([mangled])[0].removeprefix(f"{what} for ")
    return (f"the {what} of class {class_name} changed (virtual functions, bases or layout): objects that exist "
            "keep using the old one, so this cannot be live-patched")


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
        hazard = refusal_reason(block, patched) if block is not None else "is not in the patched assembler"
        if hazard:
            reasons.append((name, hazard))
    if reasons:
        names = demangle([name for name, _ in reasons])
        details = "; ".join(f"{pretty} {hazard}" for pretty, (_, hazard) in zip(names, reasons, strict=True))
        raise UnpatchableChange(f"{where}{details}: {WHY_NOT_YET}")
