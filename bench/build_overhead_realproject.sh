#!/bin/bash
# Build overhead on a real project of tests/realproject/ other than redis:
#
#   bench/build_overhead_realproject.sh cjson     libcare-patch-make --build-system cmake against one
#                                                 plain CMake configure + build (cJSON 1.7.15 from
#                                                 Debian 12, its CVE-2025-57052 fix)
#   bench/build_overhead_realproject.sh tinyxml   libcare-patch-make --build-cmd/--install-cmd against
#                                                 one plain build with the same lines (TinyXML 2.6.2
#                                                 from Debian 12, its CVE-2023-34194 fix; C++)
#   bench/build_overhead_realproject.sh nginx     libcare-patch-make -m CC=libcare-cc against one plain
#                                                 make of the configured tree (nginx 1.22.1 from Debian
#                                                 12, its CVE-2026-42945 fix; configure not timed)
#
# Both builds are measured in this run, 2 jobs (tests/realproject/NAME/build_patch.sh). It runs
# in a private cache (a copy of the prepared sources, when .cache/NAME is prepared) so it never
# touches the tree another run uses.
# Prints one line: {"bench": "build_overhead_NAME", "value": s, "unit": "s", "baseline": s, "ratio": r}
# (nginx's line has more fields: configure seconds, build-id, functions.)
# Exit status 77 when the sources are unavailable, 2 for an unknown NAME.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
name=${1:-}
case "$name" in
    cjson|tinyxml) cache_dir=$name ;;
    nginx) cache_dir=realproject-nginx ;;
    *) echo "build_overhead_realproject: unknown project '$name' (cjson, tinyxml or nginx)" >&2; exit 2 ;;
esac
cache_variable=LIBCARE_${name^^}_CACHE
shared_cache=${!cache_variable:-$root/.cache/$cache_dir}
private=$(mktemp -d "/tmp/libcare-bench-$name.XXXXXX")
trap 'rm -rf "$private"' EXIT
if [ -f "$shared_cache/pristine/.libcare-prepared" ] && [ -s "$shared_cache/fix.patch" ]; then
    cp -a "$shared_cache/pristine" "$shared_cache/fix.patch" "$private/"
fi
export "$cache_variable=$private"
echo "bench: build_overhead_$name: $root/tests/realproject/$name/build_patch.sh (cache $private)" >&2
"$root/tests/realproject/$name/build_patch.sh" | grep "\"bench\": *\"build_overhead_$name\"" | tail -n 1
exit "${PIPESTATUS[0]}"
