"""Pair the blocks of the original and the patched file and classify the differences.

Normally named functions and variables pair by name. Names gcc makes up
(``.LC3``, ``counter.2``, ``CSWTCH.8``, ``foo.part.0``, ``foo.constprop.1``) pair with
an unpaired block of the same family whose *content* is equal, so gcc renumbering them
does not look like a change; leftover auto-named functions then pair by family, one
equal but for ``__LINE__`` immediates first, else in order. Pairing repeats until
nothing new pairs, because content equality of one block may depend on another pair
(a table of pointers to literals). A paired function is changed unless its bodies are
equal, or equal but for ``__LINE__`` immediates (``line_numbers``, needs gcc -g).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UnpatchableChange
from .line_numbers import same_but_line_numbers
from .normalize import LOCAL_LABEL_PREFIX, block_signature, block_statements, symbol_tokens
from .parse import AsmFile, Block

# Original variables that may disappear from the patched file: compiler-made literals
# and tables that are referenced only by code (the code that used them changed too).
REMOVABLE_VARIABLE_PREFIXES = (".L", "__func__.", "__FUNCTION__.", "__PRETTY_FUNCTION__.", "CSWTCH.")


def family(name: str) -> str:
    """The name without gcc's numbering: ``.LC12`` -> ``.LC``, ``foo.part.0`` -> ``foo.part``."""
    if name.startswith(LOCAL_LABEL_PREFIX):
        return name.rstrip("0123456789")
    return ".".join(part for part in name.split(".") if not part.isdigit())


def is_auto_named(name: str) -> bool:
    """True for names gcc invented (numbered literals, statics and clones)."""
    return family(name) != name


@dataclass(frozen=True)
class Matching:
    """How the patched file relates to the original one."""

    patched_to_original: dict[str, str]
    function_pairs: tuple[tuple[str, str], ...]
    changed_functions: tuple[str, ...]
    new_functions: tuple[str, ...]
    new_variables: tuple[str, ...]


class _Pairing:
    """Mutable pairing state while matching (internal)."""

    def __init__(self, original: AsmFile, patched: AsmFile) -> None:
        self.original = original
        self.patched = patched
        self.patched_names = {name for block in patched.blocks for name in block.names}
        self.patched_to_original: dict[str, str] = {}
        self.paired_original: set[str] = set()
        self.function_pairs: dict[str, str] = {}
        self.original_users = users_of_symbols(original)
        self.patched_users = users_of_symbols(patched)

    def same_users(self, original_name: str, patched_name: str) -> bool:
        """True if the (paired) functions using both symbols are the same."""
        users = {self.patched_to_original.get(user, user) for user in self.patched_users.get(patched_name, ())}
        return users == self.original_users.get(original_name, set())

    def rename_patched(self, token: str) -> str:
        mapped = self.patched_to_original.get(token)
        if mapped is not None:
            return mapped
        if token.startswith(LOCAL_LABEL_PREFIX) or (token in self.patched_names and is_auto_named(token)):
            return "?" + token
        return token

    def pair(self, original: Block, patched: Block) -> None:
        self.patched_to_original[patched.name] = original.name
        self.paired_original.add(original.name)
        for nested in patched.names[1:]:
            counterpart = original.name + nested[len(patched.name):] if nested.startswith(patched.name) else nested
            if counterpart in original.names[1:]:
                self.patched_to_original[nested] = counterpart
        if patched.kind == "function":
            self.function_pairs[original.name] = patched.name

    def is_paired_patched(self, name: str) -> bool:
        return name in self.patched_to_original


def users_of_symbols(asm: AsmFile) -> dict[str, set[str]]:
    """Symbol -> names of the functions whose bodies mention it."""
    users: dict[str, set[str]] = {}
    for block in asm.blocks:
        if block.kind != "function":
            continue
        for line in block.lines:
            if line.args:
                for token in symbol_tokens(line.args):
                    users.setdefault(token, set()).add(block.name)
    return users


def _identity(token: str) -> str:
    return token


def match(original: AsmFile, patched: AsmFile) -> Matching:
    """Pair blocks, check variables, and list changed and new functions and new variables."""
    state = _Pairing(original, patched)
    tables = ((original.functions(), patched.functions()), (original.variables(), patched.variables()))
    for original_blocks, patched_blocks in tables:
        for name, block in patched_blocks.items():
            if not is_auto_named(name) and name in original_blocks:
                state.pair(original_blocks[name], block)
    original_signatures = {block.name: block_signature(block, _identity) for block in original.blocks
                           if block.kind != "other"}
    while _pair_by_content(state, tables, original_signatures):
        pass
    _pair_leftover_functions(state, tables[0], original_signatures)
    _check_variables(state, tables[1], original_signatures)
    (original_functions, patched_functions), (_, patched_variables) = tables
    changed = tuple(
        name for name in original_functions
        if name in state.function_pairs and not _same_function(
            state, original_functions[name], patched_functions[state.function_pairs[name]], original_signatures)
    )
    new_functions = tuple(name for name in patched_functions if not state.is_paired_patched(name))
    new_variables = tuple(name for name in patched_variables if not state.is_paired_patched(name))
    return Matching(dict(state.patched_to_original), tuple(state.function_pairs.items()), changed,
                    new_functions, new_variables)


def _pair_by_content(state: _Pairing, tables, original_signatures: dict[str, tuple[str, ...]]) -> bool:
    """One pass of pairing auto-named blocks whose content is equal; True if any paired."""
    progress = False
    for original_blocks, patched_blocks in tables:
        by_content: dict[tuple[str, tuple[str, ...]], list[Block]] = {}
        for name, block in patched_blocks.items():
            if is_auto_named(name) and not state.is_paired_patched(name):
                key = (family(name), block_signature(block, state.rename_patched))
                by_content.setdefault(key, []).append(block)
        if not by_content:
            continue
        for original_name, original_block in original_blocks.items():
            if original_name in state.paired_original or not is_auto_named(original_name):
                continue
            candidates = [block for block in by_content.get((family(original_name),
                                                            original_signatures[original_name]), ())
                          if not state.is_paired_patched(block.name)]
            if not candidates:
                continue
            candidates.sort(key=lambda block: (not state.same_users(original_name, block.name),
                                               block.name != original_name))
            state.pair(original_block, candidates[0])
            progress = True
    return progress


def _same_function(state: _Pairing, original: Block, patched: Block,
                   original_signatures: dict[str, tuple[str, ...]]) -> bool:
    """True if the patched body is the original one, ``__LINE__`` immediates aside."""
    if original_signatures[original.name] == block_signature(patched, state.rename_patched):
        return True
    return same_but_line_numbers(block_statements(original, _identity), block_statements(patched, state.rename_patched))


def _pair_leftover_functions(state: _Pairing, functions: tuple[dict[str, Block], dict[str, Block]],
                             original_signatures: dict[str, tuple[str, ...]]) -> None:
    original_functions, patched_functions = functions
    for original_name, original_block in original_functions.items():
        if original_name in state.paired_original or not is_auto_named(original_name):
            continue
        candidates = [block for name, block in patched_functions.items()
                      if is_auto_named(name) and not state.is_paired_patched(name)
                      and family(name) == family(original_name)]
        if candidates:
            candidates.sort(key=lambda block: not _same_function(state, original_block, block, original_signatures))
            state.pair(original_block, candidates[0])


def _check_variables(state: _Pairing, variables: tuple[dict[str, Block], dict[str, Block]],
                     original_signatures: dict[str, tuple[str, ...]]) -> None:
    original_variables, patched_variables = variables
    for name in original_variables:
        if name not in state.paired_original:
            if name.startswith(REMOVABLE_VARIABLE_PREFIXES):
                continue
            raise UnpatchableChange(
                f"variable {name} was removed or its initial value, size or section changed; "
                "existing data cannot be changed by a live patch"
            )
    original_by_patched: Callable[[str], str] = state.patched_to_original.__getitem__
    for patched_name, block in patched_variables.items():
        if not state.is_paired_patched(patched_name):
            continue
        original_name = original_by_patched(patched_name)
        if block_signature(block, state.rename_patched) != original_signatures[original_name]:
            raise UnpatchableChange(
                f"variable {original_name}: initial value, size or section changed; "
                "existing data cannot be changed by a live patch"
            )
