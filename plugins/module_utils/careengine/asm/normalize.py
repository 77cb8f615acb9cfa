"""Normalise blocks for comparison and rename symbols inside statements.

Two blocks are "the same" when their signatures are equal. A signature leaves out
what never changes the bytes or only describes them for debuggers and unwinders
(debug labels, ``.cfi_*``, linkage attributes, ``.file``/``.ident``), names the
block's own symbols and local labels by position, and maps every other symbol through
a caller-supplied rename (so a literal renumbered by gcc compares equal).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .parse import SECTIONLESS_KINDS, Block, Kind, Line

# A quoted string, a number (kept whole so '0x1f' is not read as a symbol), a symbol,
# blanks, or any other single character.
TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\d[\w.]*|[A-Za-z_.][\w.$]*|\s+|.')
LOCAL_LABEL_PREFIX = ".L"

# Statement kinds that never take part in a comparison.
IGNORED_KINDS = frozenset((Kind.DEBUG_LABEL, Kind.CFI, Kind.ATTRIBUTE, Kind.FILE, Kind.IDENT, Kind.DEBUG))

# Section name prefixes whose remainder may be a symbol name (-ffunction-sections, -fdata-sections).
SYMBOL_SECTION_PREFIXES = (".text.unlikely.", ".text.startup.", ".text.hot.", ".text.exit.", ".text.",
                           ".rodata.", ".data.rel.ro.local.", ".data.rel.ro.", ".data.rel.local.",
                           ".data.rel.", ".data.", ".bss.", ".tbss.", ".tdata.")

Rename = Callable[[str], str]


def rename_symbols(text: str, rename: Rename) -> str:
    """``text`` with every symbol token replaced by ``rename(token)``.

    Register names (after ``%``), relocation modifiers (after ``@``), numbers and
    quoted strings are never renamed.
    """
    pieces: list[str] = []
    previous = ""
    for match in TOKEN_RE.finditer(text):
        token = match.group()
        first = token[0]
        if (first.isalpha() or first in "_.") and previous not in ("%", "@"):
            pieces.append(rename(token))
        else:
            pieces.append(token)
        if not token.isspace():
            previous = token
    return "".join(pieces)


def symbol_tokens(text: str) -> list[str]:
    """The symbol tokens ``rename_symbols`` would rename, in order."""
    found: list[str] = []
    rename_symbols(text, lambda token: found.append(token) or token)
    return found


def collapse_blanks(text: str) -> str:
    """Whitespace outside strings collapsed to single blanks (for comparisons)."""
    return "".join(" " if token.isspace() else token for token in TOKEN_RE.findall(text))


def rename_section(name: str, rename: Rename) -> str:
    """A section name whose symbol suffix (``.text.foo``) is renamed like the symbol."""
    for prefix in SYMBOL_SECTION_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return prefix + rename(name[len(prefix):])
    return name


def local_labels(block: Block) -> list[str]:
    """Local (``.L``) labels a block defines, debug labels excluded, in order."""
    return [line.head for line in block.lines if line.kind is Kind.LABEL and line.head.startswith(LOCAL_LABEL_PREFIX)]


def debug_label_names(block: Block) -> dict[str, str]:
    """Debug labels a block defines -> ``.L@<kind><n>`` (the n-th of its kind: ``LFB``, ``LCOLDB``...).

    g++'s exception tables refer to them (``.uleb128 .LEHB0-.LFB12``); numbering them per
    kind keeps the comparison stable when gcc numbers them differently in the two builds.
    """
    counts: dict[str, int] = {}
    names: dict[str, str] = {}
    for line in block.lines:
        if line.kind is Kind.DEBUG_LABEL and line.head.startswith(LOCAL_LABEL_PREFIX):
            kind = line.head[len(LOCAL_LABEL_PREFIX):].rstrip("0123456789")
            names[line.head] = f".L@{kind}{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
    return names


def statement_text(line: Line, rename: Rename) -> str:
    """The statement with its symbols renamed (labels rename the defined name)."""
    if line.kind in (Kind.LABEL, Kind.DEBUG_LABEL):
        return rename(line.head) + ":"
    if not line.args:
        return line.head
    return f"{line.head}\t{rename_symbols(line.args, rename)}"


def block_signature(block: Block, rename: Rename) -> tuple[str, ...]:
    """The comparable form of a block: own names and local labels by position, others renamed."""
    return tuple(text for text, _ in block_statements(block, rename))


def block_statements(block: Block, rename: Rename) -> list[tuple[str, Line | None]]:
    """The block signature's statements with the line each comes from (None for section markers)."""
    positional = {name: f"@self{index}" for index, name in enumerate(block.names)}
    positional.update({label: f".L@{index}" for index, label in enumerate(local_labels(block))})
    positional.update(debug_label_names(block))

    def rename_in_block(token: str) -> str:
        return positional.get(token) or rename(token)

    statements: list[tuple[str, Line | None]] = []
    section = None
    for line in block.lines:
        if line.kind in IGNORED_KINDS or line.kind is Kind.SECTION:
            continue
        if line.kind not in SECTIONLESS_KINDS and line.section != section:
            section = line.section
            statements.append(("@section " + rename_section(section, rename_in_block), None))
        statements.append((collapse_blanks(statement_text(line, rename_in_block)), line))
    return statements
