#!/bin/bash
# Build overhead on the C++ real project: libcare-patch-make --build-cmd/--install-cmd
# against one plain build of the same tree with the same lines
# (tests/realproject/tinyxml/build_patch.sh: TinyXML 2.6.2 from Debian 12, its
# CVE-2023-34194 fix; both measured in this run, 2 jobs).
# It runs in a private cache (a copy of the prepared sources, when .cache/tinyxml is
# prepared) so it never touches the tree another run uses.
# Prints one line: {"bench": "build_overhead_tinyxml", "value": s, "unit": "s", "baseline": s, "ratio": r}
# Exit status 77 when the sources are unavailable.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
shared_cache=${LIBCARE_TINYXML_CACHE:-$root/.cache/tinyxml}
private=$(mktemp -d /tmp/libcare-bench-tinyxml.XXXXXX)
trap 'rm -rf "$private"' EXIT
if [ -f "$shared_cache/pristine/.libcare-prepared" ] && [ -s "$shared_cache/fix.patch" ]; then
    cp -a "$shared_cache/pristine" "$shared_cache/fix.patch" "$private/"
fi
export LIBCARE_TINYXML_CACHE=$private
echo "bench: build_overhead_tinyxml: $root/tests/realproject/tinyxml/build_patch.sh (cache $private)" >&2
"$root/tests/realproject/tinyxml/build_patch.sh" | grep '"bench": *"build_overhead_tinyxml"' | tail -n 1
exit "${PIPESTATUS[0]}"
