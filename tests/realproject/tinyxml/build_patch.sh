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
# shellcheck disable=SC2154  # patch_s: set by harness.sh functions
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
lock_cache

status=0
"$here/prepare.sh" || status=$?
[ "$status" = 0 ] || exit "$status"

# 1. the baseline: the same build lines with the plain compiler, same jobs.
rm -rf "$PLAIN"
cp -a "$PRISTINE" "$PLAIN"
log "plain build -j$JOBS in $PLAIN"
t0=$(now)
if ! (cd "$PLAIN" && CXX=g++ MAKEFLAGS="-j$JOBS" bash -c "$BUILD_CMD") > "$CACHE/plain-build.log" 2>&1; then
    tail -n 40 "$CACHE/plain-build.log" >&2
    die "plain build failed (log: $CACHE/plain-build.log)"
fi
plain_s=$(elapsed "$t0" "$(now)")
log "plain build: ${plain_s}s"

# 2. libcare-patch-make with the fix.
rm -rf "$WORK"
cp -a "$PRISTINE" "$WORK"
run_patch_make -j "$JOBS" --build-cmd "$BUILD_CMD" --install-cmd "$INSTALL_CMD"

# 3. the patch for the library, named by its build-id.
[ -f "$WORK/$LIBRARY" ] || die "no $WORK/$LIBRARY: the original-stage install did not install it"
build_id=$(readelf -n "$WORK/$LIBRARY" | sed -n 's/^ *Build ID: *\([0-9a-f]*\).*/\1/p' | head -n1)
kpatch=$WORK/patchroot/$build_id.kpatch
{ [ -n "$build_id" ] && [ -s "$kpatch" ]; } || die "no patch for $LIBRARY (build-id $build_id) in $WORK/patchroot"
log "patch for $SONAME: $kpatch"

python3 -c 'import json, sys; p, b = float(sys.argv[1]), float(sys.argv[2]); print(json.dumps({"bench": "build_overhead_tinyxml", "value": p, "unit": "s", "baseline": b, "ratio": round(p / b, 2)}))' \
    "$patch_s" "$plain_s"
