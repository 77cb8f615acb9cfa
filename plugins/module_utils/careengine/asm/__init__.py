"""gcc assembler (gas, AT&T syntax) parsing, diff and instrumented output.

The kpatch_gensrc equivalent: pure functions over text. The entry point is
:func:`gensrc.generate`.
"""
