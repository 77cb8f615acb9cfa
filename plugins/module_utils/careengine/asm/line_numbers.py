"""Recognise instructions that differ only in a ``__LINE__`` immediate.

Assert-like macros (``assert``, redis' ``serverAssert``/``serverPanic``, a project's
``CHECK``) pass ``__LINE__`` to their failure handler as an instruction immediate
(``movl $1190, %edx``). A patch that inserts or removes lines shifts every later
``__LINE__`` of the file, so without this rule each later function using such a macro
looks changed: the patch gets big, and busy functions (a thread's main loop) become
unpatchable because a thread never leaves them.

The rule (needs gcc ``-g``: it reads the ``.loc`` directives the parser keeps as each
line's :class:`~.parse.SourceLine`). Two aligned statements of a function pair are the
same when

1. both are instructions with a known source position (a ``.loc`` in the function
   before them), in source files of the same name;
2. their token sequences are equal except for integer immediates (``$N``): a register,
   symbol, displacement (``8(%rsp)``), mnemonic or data directive differing is a change;
3. for EACH differing immediate, the original value is the source line of the
   original statement's nearest preceding ``.loc`` and the patched value is the
   source line of the patched statement's nearest preceding ``.loc``. So the value is
   the line of the very statement that computes it (what ``__LINE__`` in a macro
   expanded there is; for a macro call spread over several lines gcc uses the line of
   the macro's name, which is also the statement's line), and the two values differ
   by exactly the shift of that statement.

A genuine change of a constant is still a change unless the constant happened to equal
its own statement's line in both versions (``x = 1190;`` written on line 1190, changed to
``x = 1208;`` on line 1208). Without ``.loc`` (no ``-g``) nothing is known about lines and
any difference is a change. Data (``.long N`` in tables, initialisers) is never
compared this way. When the optimiser schedules the immediate's ``mov`` after the
``.loc`` of another statement the rule does not apply and the function is reported
changed (sound, just bigger). A function judged unchanged keeps its original body in
the process, old line numbers included, which is what its callers expect.
"""

from __future__ import annotations

from collections.abc import Sequence

from .normalize import TOKEN_RE
from .parse import Kind, Line

# A statement of a block signature and the line it comes from (None: a section marker).
Statement = tuple[str, Line | None]


def same_but_line_numbers(original: Sequence[Statement], patched: Sequence[Statement]) -> bool:
    """True if two aligned statement lists differ only in ``__LINE__`` immediates."""
    if len(original) != len(patched):
        return False
    return all(original_text == patched_text or _only_line_immediates(original_line, original_text,
                                                                       patched_line, patched_text)
               for (original_text, original_line), (patched_text, patched_line) in zip(original, patched, strict=True))


def _only_line_immediates(original_line: Line | None, original_text: str,
                          patched_line: Line | None, patched_text: str) -> bool:
    if original_line is None or patched_line is None:
        return False
    if original_line.kind is not Kind.INSTRUCTION or patched_line.kind is not Kind.INSTRUCTION:
        return False
    original_source, patched_source = original_line.source, patched_line.source
    if original_source is None or patched_source is None or original_source.file != patched_source.file:
        return False
    original_tokens = TOKEN_RE.findall(original_text)
    patched_tokens = TOKEN_RE.findall(patched_text)
    if len(original_tokens) != len(patched_tokens):
        return False
    for index, (original_token, patched_token) in enumerate(zip(original_tokens, patched_tokens, strict=True)):
        if original_token == patched_token:
            continue
        is_immediate = index > 0 and original_tokens[index - 1] == "$"
        if not (is_immediate and original_token.isdigit() and patched_token.isdigit()):
            return False
        if int(original_token) != original_source.line or int(patched_token) != patched_source.line:
            return False
    return True
