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
# shellcheck disable=SC2154,SC2153  # patch_s: set by harness.sh functions; CONFIGURE_ARGS: common.sh
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
lock_cache

status=0
"$here/prepare.sh" || status=$?
[ "$status" = 0 ] || exit "$status"

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

# 1. the baseline: configure and build with the plain compilers, same options and jobs.
rm -rf "$PLAIN"
cp -a "$PRISTINE" "$PLAIN"
log "plain cmake ${CONFIGURE_ARGS[*]} + build -j$JOBS in $PLAIN"
t0=$(now)
if ! { cmake -S "$PLAIN" -B "$PLAIN/build" "${generator[@]}" "${CONFIGURE_ARGS[@]}" \
       && cmake --build "$PLAIN/build" --parallel "$JOBS"; } > "$CACHE/plain-build.log" 2>&1; then
    tail -n 40 "$CACHE/plain-build.log" >&2
    die "plain cmake build failed (log: $CACHE/plain-build.log)"
fi
plain_s=$(elapsed "$t0" "$(now)")
log "plain cmake build: ${plain_s}s"

# 2. libcare-patch-make with the fix.
rm -rf "$WORK"
cp -a "$PRISTINE" "$WORK"
configure_args=()
for arg in "${CONFIGURE_ARGS[@]}"; do configure_args+=("--configure-arg=$arg"); done
run_patch_make -j "$JOBS" --build-system cmake "${configure_args[@]}"

# 3. the patch for the library (installed 0644: not find_patch's executable), named by its build-id.
[ -f "$WORK/$LIBRARY" ] || die "no $WORK/$LIBRARY: the original-stage install did not install it"
build_id=$(readelf -n "$WORK/$LIBRARY" | sed -n 's/^ *Build ID: *\([0-9a-f]*\).*/\1/p' | head -n1)
kpatch=$WORK/patchroot/$build_id.kpatch
{ [ -n "$build_id" ] && [ -s "$kpatch" ]; } || die "no patch for $LIBRARY (build-id $build_id) in $WORK/patchroot"
log "patch for libcjson_utils: $kpatch"

python3 -c 'import json, sys; p, b = float(sys.argv[1]), float(sys.argv[2]); print(json.dumps({"bench": "build_overhead_cjson", "value": p, "unit": "s", "baseline": b, "ratio": round(p / b, 2)}))' \
    "$patch_s" "$plain_s"
