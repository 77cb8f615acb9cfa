#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Build the nginx live patch and measure what it costs.
#
#   tests/realproject/nginx/build_patch.sh
#
# 1. ./configure (common.sh: CONFIGURE_ARGS) and a plain `make -j$JOBS` of the pre-fix
#    tree in a copy ($CACHE/plain), the make timed: the baseline;
# 2. the same ./configure in another copy ($CACHE/work), run with KPATCH_STAGE unset and
#    the system compiler (configure's probes need no wrapper), then
#    `libcare-patch-make -j$JOBS -m CC=bin/libcare-cc fix.patch`, timed: the top-level
#    Makefile passes CC on to objs/Makefile (whose LINK is $(CC)); both stages install
#    with DESTDIR, the original one into $CACHE/work/lpmake (the server is
#    lpmake/usr/local/nginx/sbin/nginx) and the patch is $CACHE/work/patchroot/<build-id>.kpatch;
# 3. checks that the patch is named by the server's build-id (readelf -n) and carries it
#    in its header, and prints the patch (libcare-dump).
# Prints one JSON line on stdout:
#   {"bench": "build_overhead_nginx", "value": <patch-make s>, "unit": "s", "baseline": <make s>,
#    "ratio": <r>, "configure": <configure s>, "build_id": ..., "functions": [...]}
# Exit status: 0 ok, 77 sources unavailable (from prepare.sh), 1 failure.
# shellcheck disable=SC2154  # dsc, applied, build_id, kpatch, patch_s: set by harness.sh functions
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
prepare_or_exit "$here"

configure() {   # configure DIR LOG
    (cd "$1" && env -u KPATCH_STAGE ./configure "${CONFIGURE_ARGS[@]}") > "$2" 2>&1 || {
        tail -n 30 "$2" >&2; die "configure failed in $1 (log: $2)"; }
}

# 1. the baseline: configure, then a plain build with the same jobs.
fresh_copy "$PLAIN"
log "configure in $PLAIN"
t0=$(now)
configure "$PLAIN" "$CACHE/plain-configure.log"
configure_s=$(elapsed "$t0" "$(now)")
log "configure: ${configure_s}s"
timed_plain_build plain-make.log env -u KPATCH_STAGE make -j"$JOBS"

# 2. libcare-patch-make with the fix.
fresh_copy "$WORK"
configure "$WORK" "$CACHE/work-configure.log"
run_patch_make -j "$JOBS" -m "CC=$ROOT/bin/libcare-cc"

# 3. the patch for the server, named by its build-id.
find_patch "$WORK/$SERVER_RELPATH"
"$ROOT/bin/libcare-dump" "$kpatch" >&2 || die "libcare-dump cannot read $kpatch"
dump=$("$ROOT/bin/libcare-dump" --json "$kpatch")
log "patch for nginx: $kpatch"

"$PYTHON" - "$patch_s" "$plain_s" "$configure_s" "$build_id" "$dump" <<'EOF'
import json
import sys

patch_s, plain_s, configure_s = (float(x) for x in sys.argv[1:4])
build_id, dump = sys.argv[4], json.loads(sys.argv[5])
if dump["build_id"] != build_id:
    sys.exit(f"realproject-nginx: error: the patch header names build-id {dump['build_id']}, not {build_id}")
print(json.dumps({"bench": "build_overhead_nginx", "value": patch_s, "unit": "s", "baseline": plain_s,
                  "ratio": round(patch_s / plain_s, 2), "configure": configure_s, "build_id": build_id,
                  "functions": [f["name"] for f in dump["functions"]], "new_functions": dump["new_functions"]}))
EOF
