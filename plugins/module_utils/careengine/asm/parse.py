"""Parse gcc's gas output (AT&T syntax) into logical lines, sections and blocks.

A *line* is one statement (``label:``, a directive or an instruction) with its kind and
the section in force before and after it. Debug-only statements (``.loc``, numbered
``.file``, comments and everything inside ``.debug_*`` sections) are dropped here: they
never take part in a comparison and are not re-emitted. What ``.loc`` says is kept as
each line's :class:`SourceLine` (the source line of the nearest preceding ``.loc``),
which the diff uses to recognise ``__LINE__`` immediates (see ``line_numbers``).

A *block* is a function (from its attribute lines to its ``.size``, including gcc's
``.cold`` parts and jump tables placed in between), a variable (attributes, label, data)
or "other" (everything else: file header, footer, unlabeled data such as ``.init_array``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import AsmParseError


class Kind(enum.Enum):
    """What a logical line is, decided by its first token."""

    LABEL = "label"
    DEBUG_LABEL = "debug-label"
    SECTION = "section"
    ATTRIBUTE = "attribute"
    TYPE = "type"
    SIZE = "size"
    ALIGN = "align"
    DATA = "data"
    COMM = "comm"
    SET = "set"
    CFI = "cfi"
    FILE = "file"
    IDENT = "ident"
    DEBUG = "debug"
    DIRECTIVE = "directive"
    INSTRUCTION = "instruction"


# One row per directive we need to recognise; anything else starting with '.' is DIRECTIVE.
DIRECTIVE_KINDS: dict[str, Kind] = {
    **dict.fromkeys((".text", ".data", ".bss", ".section", ".pushsection", ".popsection", ".previous"), Kind.SECTION),
    **dict.fromkeys((".globl", ".global", ".local", ".weak", ".hidden", ".protected", ".internal"), Kind.ATTRIBUTE),
    ".type": Kind.TYPE,
    ".size": Kind.SIZE,
    **dict.fromkeys((".align", ".p2align", ".balign", ".p2alignw", ".p2alignl"), Kind.ALIGN),
    **dict.fromkeys(
        (".string", ".ascii", ".asciz", ".byte", ".value", ".short", ".word", ".hword", ".long", ".int",
         ".quad", ".octa", ".zero", ".skip", ".space", ".fill", ".float", ".double", ".single",
         ".uleb128", ".sleb128", ".2byte", ".4byte", ".8byte", ".dc.a", ".base64"),
        Kind.DATA,
    ),
    **dict.fromkeys((".comm", ".lcomm"), Kind.COMM),
    **dict.fromkeys((".set", ".equ"), Kind.SET),
    ".file": Kind.FILE,
    ".ident": Kind.IDENT,
    **dict.fromkeys((".loc", ".loc_mark_labels", ".subsection"), Kind.DEBUG),
}

# Labels gcc emits only for debug info, unwind tables and hot/cold range bookkeeping.
DEBUG_LABEL_RE = re.compile(
    r"^\.L(?:VL|BB|BE|FB|FE|FSB|CFI|VU|COLDB|COLDE|HOTB|HOTE|text_cold|etext_cold|text|etext|"
    r"debug_\w*|LST|LLST|LLRL|LVUS|ASF|ASM)\d*$"
)
SYMBOL_RE = re.compile(r"^[A-Za-z_.$][\w.$]*$")
NUMERIC_LABEL_RE = re.compile(r"^\d+$")
# A quoted file name of a ``.file`` directive.
QUOTED_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')

# Sections that hold code even when declared without flags.
CODE_SECTIONS = frozenset((".text", ".text.unlikely", ".text.hot", ".text.startup", ".text.exit", ".init", ".fini",
                           ".kpatch.text"))
COMMON_SECTION = "*COM*"
# Statements that define a symbol without placing bytes in the current section.
SECTIONLESS_KINDS = frozenset((Kind.COMM, Kind.SET))
# Sections whose contents only describe the code (debug info, hand-written unwind tables).
DROPPED_SECTION_PREFIXES = (".debug_", ".eh_frame", ".gnu.debuglto")
BARE_SECTIONS = frozenset((".text", ".data", ".bss"))


@dataclass(frozen=True)
class SourceLine:
    """A position in the C source named by a ``.loc`` directive (gcc -g)."""

    file: str
    line: int


@dataclass(frozen=True)
class Line:
    """One logical statement of the assembler file."""

    number: int
    text: str
    kind: Kind
    head: str
    args: str
    section: str
    section_after: str
    source: SourceLine | None = None

    @property
    def label(self) -> str:
        """The name a label line defines ('' for other lines)."""
        return self.head if self.kind in (Kind.LABEL, Kind.DEBUG_LABEL) else ""

    def first_arg(self) -> str:
        """The first comma-separated argument, stripped."""
        return self.args.split(",", 1)[0].strip()


@dataclass(frozen=True)
class Block:
    """A function, a variable or an "other" run of lines."""

    kind: str
    name: str
    names: tuple[str, ...]
    lines: tuple[Line, ...]

    @property
    def section(self) -> str:
        """Section of the block's first label defining its name (where its bytes live)."""
        for line in self.lines if self.name else ():
            if line.kind in SECTIONLESS_KINDS and line.first_arg() == self.name:
                return COMMON_SECTION
            if line.label == self.name:
                return line.section
        return self.lines[-1].section_after if self.lines else ".text"


@dataclass(frozen=True)
class AsmFile:
    """A parsed assembler file."""

    lines: tuple[Line, ...]
    blocks: tuple[Block, ...]
    section_specs: dict[str, str] = field(default_factory=dict)

    def is_code(self, section: str) -> bool:
        """True if ``section`` holds instructions."""
        return section_is_code(section, self.section_specs.get(section, ""))

    def functions(self) -> dict[str, Block]:
        """Function blocks by name, in file order."""
        return {block.name: block for block in self.blocks if block.kind == "function"}

    def variables(self) -> dict[str, Block]:
        """Variable blocks by name, in file order."""
        return {block.name: block for block in self.blocks if block.kind == "variable"}


def section_is_code(name: str, spec: str) -> bool:
    """True if a section of that name and ``.section`` argument string holds code."""
    flags = _section_flags(spec)
    if flags is not None:
        return "x" in flags
    return name in CODE_SECTIONS or name.startswith(".text.")


def section_is_tls(name: str, spec: str) -> bool:
    """True for thread-local data sections."""
    flags = _section_flags(spec) or ""
    return "T" in flags or name.startswith((".tbss", ".tdata"))


def _section_flags(spec: str) -> str | None:
    fields = [part.strip() for part in spec.split(",")]
    if len(fields) >= 2 and fields[1].startswith('"'):
        return fields[1].strip('"')
    return None


class SectionState:
    """The assembler's current/previous section and push stack."""

    def __init__(self, current: str = ".text") -> None:
        self.current = current
        self.previous = current
        self.stack: list[tuple[str, str]] = []

    def apply(self, head: str, args: str) -> None:
        """Update the state for one section directive."""
        if head in BARE_SECTIONS:
            self.previous, self.current = self.current, head
        elif head == ".section":
            self.previous, self.current = self.current, section_name(args)
        elif head == ".pushsection":
            self.stack.append((self.current, self.previous))
            self.previous, self.current = self.current, section_name(args)
        elif head == ".popsection":
            if not self.stack:
                raise AsmParseError(".popsection without .pushsection")
            self.current, self.previous = self.stack.pop()
        elif head == ".previous":
            self.current, self.previous = self.previous, self.current


def section_name(args: str) -> str:
    """The section name from a ``.section`` argument string."""
    return args.split(",", 1)[0].strip().strip('"')


def split_statements(physical: str) -> list[str]:
    """Split one physical line into statements: ``;`` separators, ``label:`` prefixes, ``#`` comments."""
    if not any(ch in physical for ch in '"#;:'):
        stripped = physical.strip()
        return [stripped] if stripped else []
    statements: list[str] = []
    current: list[str] = []
    in_string = False
    index = 0
    while index < len(physical):
        char = physical[index]
        if in_string:
            current.append(char)
            if char == "\\" and index + 1 < len(physical):
                current.append(physical[index + 1])
                index += 2
                continue
            if char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            current.append(char)
        elif char == "#":
            break
        elif char == ";":
            statements.append("".join(current).strip())
            current = []
        elif char == ":" and _is_label_name("".join(current).strip()):
            statements.append("".join(current).strip() + ":")
            current = []
        else:
            current.append(char)
        index += 1
    statements.append("".join(current).strip())
    return [statement for statement in statements if statement]


def _is_label_name(text: str) -> bool:
    return bool(SYMBOL_RE.match(text) or NUMERIC_LABEL_RE.match(text))


def classify(text: str) -> tuple[Kind, str, str]:
    """Kind, head (directive, mnemonic or label name) and argument string of a statement."""
    if text.endswith(":") and _is_label_name(text[:-1]):
        name = text[:-1]
        return (Kind.DEBUG_LABEL if DEBUG_LABEL_RE.match(name) else Kind.LABEL), name, ""
    parts = text.split(None, 1)
    head = parts[0]
    args = parts[1].strip() if len(parts) > 1 else ""
    if head.startswith(".cfi_"):
        return Kind.CFI, head, args
    kind = DIRECTIVE_KINDS.get(head)
    if kind is Kind.FILE and args[:1].isdigit():
        kind = Kind.DEBUG
    if kind is None:
        kind = Kind.DIRECTIVE if head.startswith(".") else Kind.INSTRUCTION
    return kind, head, args


class SourceTracker:
    """The source position ``.file N`` / ``.loc`` directives put in force."""

    def __init__(self) -> None:
        self.file_names: dict[str, str] = {}
        self.current: SourceLine | None = None

    def apply(self, head: str, args: str) -> None:
        """Update the state for one debug directive (other directives are ignored)."""
        if head == ".file":
            number, _, names = args.partition('"')
            quoted = QUOTED_RE.findall('"' + names)
            if quoted:  # .file N "name" or, for DWARF 5, .file N "dir" "name": the name
                self.file_names[number.strip()] = quoted[-1]
        elif head == ".loc":
            fields = args.split()
            if len(fields) >= 2 and fields[1].isdigit():
                self.current = SourceLine(self.file_names.get(fields[0], fields[0]), int(fields[1]))

    def start_symbol(self) -> None:
        """A new symbol starts (``.type``): nothing is known until its first ``.loc``."""
        self.current = None


def _dropped_as_a_whole(physical: str) -> bool:
    """Whether a line inside a dropped section (debug info, unwind tables) can be skipped
    unparsed: one data directive or one label, which neither changes the section nor the
    source position (most of a ``-g`` file; parsing it would be most of the work)."""
    if ";" in physical:
        return False
    stripped = physical.strip()
    if not stripped:
        return True
    head = stripped.split(None, 1)[0]
    if DIRECTIVE_KINDS.get(head) is Kind.DATA:
        return True
    return head == stripped and stripped.endswith(":")


def parse_lines(text: str) -> tuple[list[Line], dict[str, str]]:
    """Logical lines of ``text`` without debug-only statements, and the section specs seen."""
    state = SectionState()
    source = SourceTracker()
    specs: dict[str, str] = {}
    lines: list[Line] = []
    for number, physical in enumerate(text.splitlines(), start=1):
        if state.current.startswith(DROPPED_SECTION_PREFIXES) and _dropped_as_a_whole(physical):
            continue
        for statement in split_statements(physical):
            kind, head, args = classify(statement)
            before = state.current
            if kind is Kind.SECTION:
                state.apply(head, args)
                if head in (".section", ".pushsection") and "," in args:
                    specs.setdefault(section_name(args), args)
            elif kind is Kind.DEBUG:
                source.apply(head, args)
            elif kind is Kind.TYPE:
                source.start_symbol()
            if kind is Kind.DEBUG or (state.current.startswith(DROPPED_SECTION_PREFIXES) and kind is not Kind.IDENT):
                continue
            lines.append(Line(number, statement, kind, head, args, before, state.current, source.current))
    if state.stack:
        raise AsmParseError(".pushsection without .popsection at end of file")
    return lines, specs


def parse(text: str) -> AsmFile:
    """Parse gcc's assembler output into lines and blocks."""
    lines, specs = parse_lines(text)
    blocks = _cut_blocks(lines, specs)
    return AsmFile(tuple(lines), tuple(blocks), specs)


def symbol_type(line: Line) -> tuple[str, str]:
    """(name, type) of a ``.type name, @kind`` line."""
    name, _, kind = line.args.partition(",")
    return name.strip(), kind.strip().lstrip("@%").strip('"')


_PREAMBLE_KINDS = frozenset((Kind.SECTION, Kind.ALIGN, Kind.DEBUG_LABEL))
_NAMED_PREAMBLE_KINDS = frozenset((Kind.ATTRIBUTE, Kind.TYPE, Kind.SIZE))
_VARIABLE_HEAD_KINDS = frozenset((Kind.ATTRIBUTE, Kind.TYPE, Kind.SIZE, Kind.ALIGN, Kind.SECTION))


def _cut_blocks(lines: list[Line], specs: dict[str, str]) -> list[Block]:
    owner: list[bool] = [False] * len(lines)
    spans: list[tuple[int, int, str, str, tuple[str, ...]]] = []
    index = 0
    while index < len(lines):
        found = None if owner[index] else _anchor(lines, index, specs)
        if found is None:
            index += 1
            continue
        kind, name = found
        start = _preamble_start(lines, owner, index, name)
        if kind == "function":
            end, names = _function_end(lines, index, name)
            end = _absorb_trailer(lines, end)
        else:
            end, names = _variable_end(lines, index, name), (name,)
        for position in range(start, end + 1):
            owner[position] = True
        spans.append((start, end, kind, name, names))
        index = end + 1
    return _with_other_blocks(lines, spans)


def _anchor(lines: list[Line], index: int, specs: dict[str, str]) -> tuple[str, str] | None:
    line = lines[index]
    if line.kind is Kind.TYPE:
        name, sym_type = symbol_type(line)
        if sym_type in ("function", "gnu_indirect_function"):
            return ("function", name) if _has_body(lines, index, name) else None
        if sym_type in ("object", "tls_object"):
            return "variable", name
    if line.kind in (Kind.COMM, Kind.SET):
        return "variable", line.first_arg()
    if line.kind is Kind.LABEL and SYMBOL_RE.match(line.head):
        if not section_is_code(line.section, specs.get(line.section, "")):
            return "variable", line.head
    return None


def _has_body(lines: list[Line], index: int, name: str) -> bool:
    """False for a function symbol defined by ``.set`` (an ifunc or alias), not by a label."""
    for line in lines[index + 1:]:
        if line.label == name:
            return True
        if line.kind is Kind.SET and line.first_arg() == name:
            return False
    return False


def _preamble_start(lines: list[Line], owner: list[bool], index: int, name: str) -> int:
    start = index
    while start > 0 and not owner[start - 1]:
        previous = lines[start - 1]
        if previous.kind in _PREAMBLE_KINDS:
            start -= 1
        elif previous.kind in _NAMED_PREAMBLE_KINDS and previous.first_arg() == name:
            start -= 1
        else:
            break
    return start


def _function_end(lines: list[Line], index: int, name: str) -> tuple[int, tuple[str, ...]]:
    names = [name]
    open_names = {name}
    position = index + 1
    while position < len(lines):
        line = lines[position]
        if line.kind is Kind.TYPE:
            nested, sym_type = symbol_type(line)
            if sym_type == "function" and nested not in names:
                names.append(nested)
                open_names.add(nested)
        elif line.kind is Kind.SIZE and line.first_arg() in open_names:
            open_names.discard(line.first_arg())
            if not open_names:
                return position, tuple(names)
        position += 1
    raise AsmParseError(f"function {name} has no .size directive")


def _absorb_trailer(lines: list[Line], end: int) -> int:
    last = end
    position = end + 1
    while position < len(lines) and lines[position].kind in (Kind.DEBUG_LABEL, Kind.SECTION):
        if lines[position].kind is Kind.DEBUG_LABEL:
            last = position
        position += 1
    return last


def _variable_end(lines: list[Line], index: int, name: str) -> int:
    position = index
    if lines[index].kind in SECTIONLESS_KINDS:
        return index
    if lines[index].label != name:
        position = index + 1
        while position < len(lines) and lines[position].label != name:
            if lines[position].kind not in _VARIABLE_HEAD_KINDS:
                return position - 1
            position += 1
        if position == len(lines):
            return index
    while position + 1 < len(lines) and lines[position + 1].kind is Kind.DATA:
        position += 1
    return position


def _with_other_blocks(lines: list[Line], spans: Iterable[tuple[int, int, str, str, tuple[str, ...]]]) -> list[Block]:
    blocks: list[Block] = []
    cursor = 0
    for start, end, kind, name, names in spans:
        if start > cursor:
            blocks.append(Block("other", "", (), tuple(lines[cursor:start])))
        blocks.append(Block(kind, name, names, tuple(lines[start:end + 1])))
        cursor = end + 1
    if cursor < len(lines):
        blocks.append(Block("other", "", (), tuple(lines[cursor:])))
    return blocks


def split_top_level(text: str, opening: str, closing: str) -> list[str]:
    """``text`` split at commas that are not inside any of the ``opening``/``closing`` brackets."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char in opening:
            depth += 1
        elif char in closing:
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts
