"""careengine: the live-patching engine behind the libcare.livepatch collection.

Build side: ``asm`` (assembler diff) and ``build`` (compiler wrapper, two-pass build,
extraction). Apply side: ``process`` (a live process under ptrace) and ``apply``
(placing, relocating, safety check, jumps). Shared: ``errors``, ``elf``, ``patchfile``,
``storage``, ``results``.
"""
