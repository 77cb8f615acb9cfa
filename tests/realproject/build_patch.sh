#!/bin/bash
# Build the real project's live patch and measure what it costs.
#
#   tests/realproject/build_patch.sh
#
# 1. plain `make` of the pre-fix tree in a copy ($CACHE/plain), timed: the baseline;
# 2. `libcare-patch-make` with the fix in another copy ($CACHE/work), timed: builds
#    through libcare-cc twice, installs into $CACHE/work/lpmake (redis' install root
#    variable is PREFIX) and writes $CACHE/work/patchroot/<build-id>.kpatch;
# 3. checks that the patch for lpmake/bin/redis-server is there, named by the
#    server's build-id (readelf -n), and carries that build-id in its header.
# Prints one JSON line on stdout:
#   {"bench": "build_overhead", "value": <patch-make s>, "unit": "s", "baseline": <make s>, "ratio": <r>}
# Exit status: 0 ok, 77 sources unavailable (from prepare.sh), 1 failure.
# shellcheck disable=SC2154  # build_id, kpatch: set by harness.sh functions
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
prepare_or_exit "$here"

# 1. the baseline: a plain build, same make arguments and jobs.
fresh_copy "$PLAIN"
timed_plain_build plain-make.log make -j"$JOBS" "${MAKE_ARGS[@]}"

# 2. libcare-patch-make with the fix.
fresh_copy "$WORK"
make_args=(-m "CC=$ROOT/bin/libcare-cc")
for arg in "${MAKE_ARGS[@]}"; do make_args+=(-m "$arg"); done
run_patch_make -j "$JOBS" --destdir PREFIX "${make_args[@]}"

# 3. the patch for the server, named by its build-id.
find_patch "$WORK/lpmake/bin/redis-server"
(cd "$ROOT" && "$PYTHON" - "$kpatch" "$build_id" <<'EOF'
import sys
from plugins.module_utils.careengine.patchfile import load_patch, summarize
path, build_id = sys.argv[1:]
summary = summarize(load_patch(path))
assert summary.build_id == build_id, f"{path}: header names build-id {summary.build_id}, not {build_id}"
replaced = ", ".join(f.name if hasattr(f, "name") else str(f) for f in summary.functions)
print(f"realproject: {path}: level {summary.level}, {summary.total_size} bytes; replaces {replaced};"
      f" adds {', '.join(summary.new_functions) or '-'}", file=sys.stderr)
EOF
) || die "$kpatch is not a patch for build-id $build_id"
log "patch for redis-server: $kpatch"

print_overhead build_overhead
