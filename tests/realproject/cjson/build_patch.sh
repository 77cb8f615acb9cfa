#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Build cJSON's live patch and measure what it costs.
#
#   tests/realproject/cjson/build_patch.sh
#
# 1. plain CMake configure + build of the pre-fix tree in a copy ($CACHE/plain), timed:
#    the baseline;
# 2. `libcare-patch-make --build-system cmake` with the fix in another copy ($CACHE/work),
#    timed: configures with the wrappers, builds twice, installs into $CACHE/work/lpmake
#    and writes $CACHE/work/patchroot/<build-id>.kpatch;
# 3. checks that the patch for libcjson_utils is there, named by its build-id.
# Prints one JSON line on stdout:
#   {"bench": "build_overhead_cjson", "value": <patch-make s>, "unit": "s", "baseline": <cmake s>, "ratio": <r>}
# Exit status: 0 ok, 77 sources unavailable (from prepare.sh), 1 failure.
# shellcheck disable=SC2153  # CONFIGURE_ARGS: common.sh
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
prepare_or_exit "$here"

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

# 1. the baseline: configure and build with the plain compilers, same options and jobs.
plain_cmake() {
    cmake -S . -B build "${generator[@]}" "${CONFIGURE_ARGS[@]}" && cmake --build build --parallel "$JOBS"
}
fresh_copy "$PLAIN"
timed_plain_build plain-build.log plain_cmake

# 2. libcare-patch-make with the fix.
fresh_copy "$WORK"
configure_args=()
for arg in "${CONFIGURE_ARGS[@]}"; do configure_args+=("--configure-arg=$arg"); done
run_patch_make -j "$JOBS" --build-system cmake "${configure_args[@]}"

# 3. the patch for the library (installed 0644: not find_patch's executable), named by its build-id.
find_library_patch "$LIBRARY"

print_overhead build_overhead_cjson
