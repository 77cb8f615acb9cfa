#!/usr/bin/env python3
"""Build overhead on the largest fixture project (the fallback of build_overhead.sh).

tests/fixtures/projects/libdemo (an executable and a shared library): ``make`` in a
fresh copy (the baseline) against ``libcare-patch-make fix.patch`` in another fresh
copy, ``ROUNDS`` times each, medians. Both use the system compiler's defaults; the
patch build goes through bin/libcare-cc as it does by default.

Prints build_overhead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from benchlib import PATCH_MAKE, ROOT, emit, log, median, workdir

PROJECT = ROOT / "tests" / "fixtures" / "projects" / "libdemo"
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3


def timed(argv: list[str], cwd) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    return time.perf_counter() - started


def main() -> None:
    plain, patch_make = [], []
    with workdir() as where:
        for round_number in range(ROUNDS):
            copy = shutil.copytree(PROJECT, where / f"plain{round_number}")
            plain.append(timed(["make"], copy))
            copy = shutil.copytree(PROJECT, where / f"patch{round_number}")
            patch_make.append(timed([str(PATCH_MAKE), "fix.patch"], copy))
    log(f"build_overhead on fixture libdemo: make s {plain}; libcare-patch-make s {patch_make}")
    emit("build_overhead", median(patch_make), "s", median(plain))


if __name__ == "__main__":
    main()
