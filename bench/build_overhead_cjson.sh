#!/bin/bash
# Build overhead on the CMake real project: libcare-patch-make --build-system cmake against
# one plain CMake configure + build of the same tree (tests/realproject/cjson/build_patch.sh:
# cJSON 1.7.15 from Debian 12, its CVE-2025-57052 fix; both measured in this run, 2 jobs).
# It runs in a private cache (a copy of the prepared sources, when .cache/cjson is
# prepared) so it never touches the tree another run uses.
# Prints one line: {"bench": "build_overhead_cjson", "value": s, "unit": "s", "baseline": s, "ratio": r}
# Exit status 77 when the sources are unavailable.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
shared_cache=${LIBCARE_CJSON_CACHE:-$root/.cache/cjson}
private=$(mktemp -d /tmp/libcare-bench-cjson.XXXXXX)
trap 'rm -rf "$private"' EXIT
if [ -f "$shared_cache/pristine/.libcare-prepared" ] && [ -s "$shared_cache/fix.patch" ]; then
    cp -a "$shared_cache/pristine" "$shared_cache/fix.patch" "$private/"
fi
export LIBCARE_CJSON_CACHE=$private
echo "bench: build_overhead_cjson: $root/tests/realproject/cjson/build_patch.sh (cache $private)" >&2
"$root/tests/realproject/cjson/build_patch.sh" | grep '"bench": *"build_overhead_cjson"' | tail -n 1
exit "${PIPESTATUS[0]}"
