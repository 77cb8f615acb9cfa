"""Applying, removing and reporting live patches in running processes.

The steps, in the order they run (one module each):

* :mod:`.objects`  — ELF facts of the objects a patient maps, parsed once per build-id
  (symbols through the hash tables, symbol versions, DT_NEEDED, CFI through
  ``.eh_frame_hdr``);
* :mod:`.image`    — the patch's relocatable ELF: sections, symbols, relocations;
* :mod:`.layout`   — where things go in the patch mapping and where the mapping goes;
* :mod:`.relocate` — relocation arithmetic, one recipe per type;
* :mod:`.safety`   — is any thread inside code we are about to replace or remove;
* :mod:`.engine`   — patch / unpatch / info of one process, in that order of steps;
* :mod:`.operations`      — the public functions (many processes); :mod:`.ctl` — ``libcare-ctl``.
"""
