#!/bin/bash
# Build overhead: libcare-patch-make against one plain make of the same project.
#
#   bench/build_overhead.sh
#
# The real project first (tests/realproject/build_patch.sh: redis 7.0.15 from Debian 12,
# its CVE-2025-67733 fix; plain `make -j2` timed against `libcare-patch-make -j2`, both
# measured in this run). It runs in a private cache (a copy of the prepared sources,
# when .cache/realproject is prepared) so it never touches the tree another run uses.
# When the real project is unavailable (no sources: exit 77), fails or takes longer
# than its limit, the largest fixture project instead (bench/build_overhead_fixture.py),
# and stderr says so.
# Prints one line: {"bench": "build_overhead", "value": s, "unit": "s", "baseline": s, "ratio": r}
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
py=$root/.venv/bin/python
[ -x "$py" ] || py=python3
script=$root/tests/realproject/build_patch.sh
shared_cache=${LIBCARE_REALPROJECT_CACHE:-$root/.cache/realproject}

if [ -x "$script" ]; then
    private=$(mktemp -d /tmp/libcare-bench-realproject.XXXXXX)
    trap 'rm -rf "$private"' EXIT
    if [ -f "$shared_cache/pristine/.libcare-prepared" ] && [ -s "$shared_cache/fix.patch" ]; then
        cp -a "$shared_cache/pristine" "$shared_cache/fix.patch" "$private/"
        export LIBCARE_REALPROJECT_CACHE=$private
    fi
    echo "bench: build_overhead: $script (cache ${LIBCARE_REALPROJECT_CACHE:-$shared_cache})" >&2
    # A time limit of its own (LIBCARE_BENCH_REALPROJECT_LIMIT, default 270 s), so a
    # slow machine still gets the fixture figure within run_all's limit.
    line=$(timeout --kill-after=10 "${LIBCARE_BENCH_REALPROJECT_LIMIT:-270}" "$script" \
           | grep '"bench": *"build_overhead"' | tail -n 1)
    status=${PIPESTATUS[0]}
    if [ "$status" = 0 ] && [ -n "$line" ]; then
        echo "bench: build_overhead measured on the real project (redis, tests/realproject)" >&2
        echo "$line"
        exit 0
    fi
    echo "bench: build_overhead: the real project is unavailable (exit $status); measuring the largest fixture project instead" >&2
else
    echo "bench: build_overhead: no $script; measuring the largest fixture project instead" >&2
fi
"$py" "$here/build_overhead_fixture.py"
