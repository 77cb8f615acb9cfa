"""Which changes of a C++ unit a live patch may carry.

Changed and new C++ functions may call others, throw, and catch: the patch carries their
unwind records and exception tables (:mod:`.eh_frame`) and the apply step registers
them in the patient's unwinder, so an exception thrown through patched code is caught
where it was before.

Inline functions and template instances are patched once, consistently: g++ emits one
copy in a COMDAT group in every unit that does not inline them, every such unit shows
the change, and each writes its new copy in a COMDAT group of its own so the patched link
keeps one, which replaces the copy the original link kept (:mod:`.comdat`); callers
that inlined the old body are changed functions of their units and are patched with
them. The extraction refuses a function whose new copies differ between units
(different flags or macros).

Refused, with :class:`UnpatchableChange` naming the functions or classes demangled and
the reason:

* a function in an old-style link-once section (``.gnu.linkonce.*``, not a COMDAT group);
* new data that needs start-up code or an exit-time destructor, or that a COMDAT group
  shares between units (:mod:`.cxx_data`; function-local statics, their guards and
  literals are carried);
* a changed vtable, typeinfo or VTT of a class (a changed set of virtual functions or
  bases): objects that exist keep pointing at the old one (:func:`describe_class_data`).
"""
from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence

from ..errors import UnpatchableChange
from .parse import AsmFile, Block

WHY_NOT = "this cannot be live-patched"
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


def refusal_reason(block: Block) -> str | None:
    """Why ``block`` cannot be patched as a C++ function; None when it can."""
    if block.section.startswith(".gnu.linkonce"):
        return "is in an old-style link-once section (.gnu.linkonce), which a patch cannot keep one copy of"
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
    from .cxx_data import check_new_data  # it uses demangle: imported here, not at the top

    where = f"{source}: " if source else ""
    changed, new_functions = list(changed), list(new_functions)
    check_new_data(patched, changed, new_functions, new_variables, source=source)
    functions = patched.functions()
    reasons = []
    for name in list(changed) + list(new_functions):
        block = functions.get(name)
        hazard = refusal_reason(block) if block is not None else "is not in the patched assembler"
        if hazard:
            reasons.append((name, hazard))
    if reasons:
        names = demangle([name for name, _ in reasons])
        details = "; ".join(f"{pretty} {hazard}" for pretty, (_, hazard) in zip(names, reasons, strict=True))
        raise UnpatchableChange(f"{where}{details}: {WHY_NOT}")
