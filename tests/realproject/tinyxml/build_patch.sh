#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Build TinyXML's live patch and measure what it costs.
#
#   tests/realproject/tinyxml/build_patch.sh
#
# 1. a plain build of the pre-fix tree in a copy ($CACHE/plain) with Debian's build lines,
#    timed: the baseline;
# 2. `libcare-patch-make --build-cmd ... --install-cmd ...` with the fix in another copy
#    ($CACHE/work), timed: builds twice through the wrappers, installs into
#    $CACHE/work/lpmake and writes $CACHE/work/patchroot/<build-id>.kpatch;
# 3. checks that the patch for libtinyxml.so.2.6.2 is there, named by its build-id.
# Prints one JSON line on stdout:
#   {"bench": "build_overhead_tinyxml", "value": <patch-make s>, "unit": "s", "baseline": <plain s>, "ratio": <r>}
# Exit status: 0 ok, 77 sources unavailable (from prepare.sh), 1 failure.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
prepare_or_exit "$here"

# 1. the baseline: the same build lines with the plain compiler, same jobs.
fresh_copy "$PLAIN"
timed_plain_build plain-build.log env CXX=g++ MAKEFLAGS="-j$JOBS" bash -c "$BUILD_CMD"

# 2. libcare-patch-make with the fix.
fresh_copy "$WORK"
run_patch_make -j "$JOBS" --build-cmd "$BUILD_CMD" --install-cmd "$INSTALL_CMD"

# 3. the patch for the library, named by its build-id.
find_library_patch "$LIBRARY"

print_overhead build_overhead_tinyxml
