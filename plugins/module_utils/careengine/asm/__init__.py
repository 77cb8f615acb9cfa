"""gcc assembler (gas, AT&T syntax) parsing, diff and instrumented output.

The kpatch_gensrc equivalent: pure functions over text, no files or processes.

- ``parse``: logical lines with kinds and sections, cut into function/variable/other blocks;
- ``normalize``: comparable block signatures and symbol renaming inside statements;
- ``match``: pairing of original and patched blocks (by name, or by content for names
  gcc numbers), changed/new functions, refusal of changed data;
- ``line_numbers``: instructions that differ only in ``__LINE__`` immediates (lines
  inserted above an assert-like macro) are no change, judged from gcc -g ``.loc``;
- ``emit``: the instrumented assembler (original layout + ``.kpatch.*`` sections);
- ``gotpcrel``: patched bodies reach data the unit does not define through the GOT
  (no new copy relocation shifts the executable's ``.bss``);
- ``gensrc``: the entry point :func:`gensrc.generate`, and prototype checks from
  ``gcc -aux-info`` (:func:`gensrc.parse_aux_info`, :func:`gensrc.check_signatures`).
"""
