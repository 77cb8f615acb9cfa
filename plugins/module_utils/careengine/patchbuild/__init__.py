"""The build side: the ``libcare-cc`` compiler wrapper, the two-stage project build
(``libcare-patch-make``) and extraction of patch files from linked binaries.

Public API: :func:`.project_build.build_patches` (and :func:`build.extract.extract_patch`).
"""
