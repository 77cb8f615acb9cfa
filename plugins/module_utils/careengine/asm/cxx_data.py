"""Which new data of a C++ unit a live patch may carry.

A patch carries new variables in its own ``.kpatch.data`` (zero-filled or with their
initial bytes, as for C), and the code that uses them comes along in the patch. That is
enough when the new code itself initialises the data, or when it needs no code at all:

* a function-local ``static`` (``_ZZ...``) and its guard (``_ZGVZ...``): the guard starts
  at zero, so the first call of the patched function constructs the object;
* literals (``.LC...``, the bytes of a ``std::string`` built from a literal), constant
  tables and namespace-scope objects with a constant initialiser;
* read-only data of an inline function or template (COMDAT): a private copy of
  constant bytes reads the same.

Refused, naming the object demangled (:class:`UnpatchableChange`):

* a namespace-scope object with a dynamic initialiser: its constructor runs from the
  unit's ``_GLOBAL__sub_I_...`` function at program start, which a live process has
  passed already (:func:`check_static_init`, before the diff);
* a change of that start-up code for existing objects (their new initialiser would
  never run either);
* a new function-local static whose destructor is registered at exit (``__cxa_atexit``,
  e.g. a ``static std::string``): the registration would point into the patch's memory,
  which unpatch and a level change unmap, and the process would crash when it exits;
* writable data, or a guard, of an inline function, inline variable or template
  (COMDAT): the program shares one copy between units, a patch's own copy would split it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..errors import UnpatchableChange
from .cxx import demangle
from .match import is_auto_named, users_of_symbols
from .normalize import symbol_tokens
from .parse import AsmFile, Block, Kind

# The unit's start-up code: g++'s constructor function and the helper it may call (-O0).
STATIC_INIT_PREFIXES = ("_GLOBAL__sub_I_", "_Z41__static_initialization_and_destruction_0")
# Calls that register a destructor to run at exit (or at thread exit).
EXIT_REGISTRATIONS = frozenset(("__cxa_atexit", "atexit", "__cxa_thread_atexit", "__cxa_thread_atexit_impl"))
# References whose new blocks the emitter replaces by pointer slots of the patch's own.
POINTER_SLOT_PREFIX = "DW.ref."
FUNCTION_LOCAL_PREFIXES = ("_ZZ", "_ZGVZ")
GUARD_PREFIX = "_ZGV"

DYNAMIC_INIT = ("has a dynamic initialiser: it would run in the unit's start-up code ({init}), which a "
                "running process has passed, so the object would never be constructed")
EXIT_DESTRUCTOR = ("has a destructor registered at exit (__cxa_atexit) that would live in the patch's "
                   "memory, unmapped by unpatch: the process would crash when it exits; use a constant "
                   "(constexpr, std::string_view, const char[]) or a static that needs no destructor")
SHARED_COMDAT = ("is writable data or a guard of an inline function, inline variable or template "
                 "(COMDAT, one copy shared by every unit): a patch's own copy would split it")
START_UP_CHANGED = ("the start-up code of the unit ({init}) changed, initialising {objects}: it ran when "
                    "the process started and a live patch cannot run it again")


def is_static_init(name: str) -> bool:
    """True for the functions g++ emits to run a unit's dynamic initialisers at start-up."""
    return name.startswith(STATIC_INIT_PREFIXES)


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _refuse(found: list[tuple[str, str]], source: str) -> None:
    """One refusal naming every object (demangled), grouped by reason; a guard is named
    only when its object is not."""
    named = {name for name, _ in found}
    found = [(name, reason) for name, reason in found
             if not (name.startswith(GUARD_PREFIX) and "_Z" + name[len(GUARD_PREFIX):] in named)]
    if not found:
        return
    pretty = dict(zip((name for name, _ in found), demangle([name for name, _ in found]), strict=True))
    by_reason: dict[str, list[str]] = {}
    for name, reason in found:
        by_reason.setdefault(reason, []).append(pretty[name])
    details = "; ".join(f"{', '.join(names)} {reason}" for reason, names in by_reason.items())
    raise UnpatchableChange(f"{_where(source)}{details}")


def _data_variables(asm: AsmFile) -> dict[str, Block]:
    """Variables that hold bytes (not ``.set`` aliases, which g++ writes for constructors)."""
    return {name: block for name, block in asm.variables().items()
            if not any(line.kind is Kind.SET and line.first_arg() == name for line in block.lines)}


def _start_up_objects(asm: AsmFile) -> dict[str, str]:
    """Variables the unit's start-up code refers to -> the start-up function referring to it."""
    variables = _data_variables(asm)
    found: dict[str, str] = {}
    for symbol, users in users_of_symbols(asm).items():
        starters = sorted(user for user in users if is_static_init(user))
        if starters and symbol in variables:
            found[symbol] = starters[0]
    return found


def check_static_init(original: AsmFile, patched: AsmFile, *, source: str = "") -> None:
    """Refuse new namespace-scope objects that the patched unit's start-up code initialises.

    Runs before the diff: when the unit had no start-up code, the new one also adds an
    ``.init_array`` entry, and the object is the thing to name, not that entry.
    """
    existing = set(_data_variables(original))
    _refuse([(name, DYNAMIC_INIT.format(init=init)) for name, init in _start_up_objects(patched).items()
             if name not in existing and not is_auto_named(name)], source)


def _family_blocks(functions: dict[str, Block], name: str) -> list[Block]:
    """A function and its split parts (``f.cold``, ``f.part.0``...)."""
    base = name.split(".", 1)[0]
    return [block for other, block in functions.items() if other == base or other.startswith(base + ".")]


def _registers_exit_destructor(block: Block) -> bool:
    return any(token in EXIT_REGISTRATIONS for line in block.lines if line.args
               for token in symbol_tokens(line.args))


class _NewData:
    """What is known about the patched unit while classifying its new variables."""

    def __init__(self, patched: AsmFile) -> None:
        self.patched = patched
        self.variables = patched.variables()
        self.functions = patched.functions()
        self.users = users_of_symbols(patched)

    def is_comdat(self, block: Block) -> bool:
        spec = self.patched.section_specs.get(block.section, "")
        return "comdat" in spec or block.section.startswith(".gnu.linkonce")

    def is_writable(self, block: Block) -> bool:
        fields = [part.strip() for part in self.patched.section_specs.get(block.section, "").split(",")]
        if len(fields) >= 2 and fields[1].startswith('"'):
            return "w" in fields[1]
        return not block.section.startswith(".rodata")

    def registered_at_exit(self, name: str) -> bool:
        """True if a function using ``name`` (or one of its split parts) registers an exit destructor.

        Conservative: every new static of such a function counts, not only the one whose
        address goes to ``__cxa_atexit``.
        """
        object_name = "_Z" + name[len(GUARD_PREFIX):] if name.startswith(GUARD_PREFIX) else name
        users = self.users.get(object_name, set()) | self.users.get(name, set())
        return any(_registers_exit_destructor(part) for user in users
                   for part in _family_blocks(self.functions, user))


def _comdat_reason(facts: _NewData, name: str, block: Block) -> str | None:
    if facts.is_comdat(block) and (facts.is_writable(block) or name.startswith(GUARD_PREFIX)):
        return SHARED_COMDAT
    return None


def _function_local_reason(facts: _NewData, name: str, block: Block) -> str | None:
    """Read-only data is never destroyed; a COMDAT static is :func:`_comdat_reason`'s."""
    if name.startswith(FUNCTION_LOCAL_PREFIXES) and facts.is_writable(block) and not facts.is_comdat(block) \
            and facts.registered_at_exit(name):
        return EXIT_DESTRUCTOR
    return None


def _start_up_reason(facts: _NewData, name: str, block: Block) -> str | None:
    starters = sorted(user for user in facts.users.get(name, ()) if is_static_init(user))
    return DYNAMIC_INIT.format(init=starters[0]) if starters else None


# Checks of one new variable, in order; the first reason found refuses it.
NEW_DATA_CHECKS: tuple[Callable[[_NewData, str, Block], str | None], ...] = (
    _comdat_reason, _function_local_reason, _start_up_reason,
)


def _reason(facts: _NewData, name: str) -> str | None:
    block = facts.variables.get(name)
    if block is None or name.startswith(POINTER_SLOT_PREFIX):
        return None
    for check in NEW_DATA_CHECKS:
        reason = check(facts, name, block)
        if reason:
            return reason
    return None


def check_new_data(patched: AsmFile, changed: Iterable[str], new_functions: Iterable[str],
                   new_variables: Iterable[str], *, source: str = "") -> None:
    """Refuse the new data, or the changed start-up code, a live patch cannot carry (module docstring)."""
    facts = _NewData(patched)
    found = [(name, reason) for name in new_variables if (reason := _reason(facts, name))]
    _refuse(found, source)
    starters = [name for name in list(changed) + list(new_functions) if is_static_init(name)]
    if starters:
        objects = sorted(name for name, init in _start_up_objects(patched).items() if init in starters)
        pretty = ", ".join(demangle(objects)) or "no named object"
        raise UnpatchableChange(f"{_where(source)}" + START_UP_CHANGED.format(init=", ".join(starters),
                                                                              objects=pretty))
