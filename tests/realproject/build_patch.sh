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
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
lock_cache

status=0
"$here/prepare.sh" || status=$?
[ "$status" = 0 ] || exit "$status"

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }

# 1. the baseline: a plain build, same make arguments and jobs.
rm -rf "$PLAIN"
cp -a "$PRISTINE" "$PLAIN"
log "plain make -j$JOBS ${MAKE_ARGS[*]} in $PLAIN"
t0=$(now)
if ! make -C "$PLAIN" -j"$JOBS" "${MAKE_ARGS[@]}" > "$CACHE/plain-make.log" 2>&1; then
    tail -n 40 "$CACHE/plain-make.log" >&2
    die "plain make failed (log: $CACHE/plain-make.log)"
fi
plain_s=$(elapsed "$t0" "$(now)")
log "plain make: ${plain_s}s"

# 2. libcare-patch-make with the fix.
rm -rf "$WORK"
cp -a "$PRISTINE" "$WORK"
make_args=(-m "CC=$ROOT/bin/libcare-cc")
for arg in "${MAKE_ARGS[@]}"; do make_args+=(-m "$arg"); done
log "libcare-patch-make -j$JOBS --destdir PREFIX ${make_args[*]} $FIX_PATCH (in $WORK)"
t0=$(now)
if ! (cd "$WORK" && "$ROOT/bin/libcare-patch-make" -j "$JOBS" --destdir PREFIX "${make_args[@]}" "$FIX_PATCH") \
        > "$CACHE/patch-make.out" 2> "$CACHE/patch-make.err"; then
    cat "$CACHE/patch-make.out" >&2
    tail -n 80 "$CACHE/patch-make.err" >&2
    die "libcare-patch-make failed (stderr: $CACHE/patch-make.err, make logs: $WORK/.lpmaketmp/)"
fi
patch_s=$(elapsed "$t0" "$(now)")
cat "$CACHE/patch-make.out" >&2
log "libcare-patch-make: ${patch_s}s"

# 3. the patch for the server, named by its build-id.
server=$WORK/lpmake/bin/redis-server
[ -x "$server" ] || die "no $server: make install PREFIX=lpmake did not install the server"
build_id=$(readelf -n "$server" | sed -n 's/^ *Build ID: *\([0-9a-f]*\).*/\1/p' | head -n1)
[ -n "$build_id" ] || die "$server has no GNU build-id"
kpatch=$WORK/patchroot/$build_id.kpatch
[ -s "$kpatch" ] || die "no patch for redis-server (build-id $build_id) in $WORK/patchroot: $(ls "$WORK/patchroot" 2>&1)"
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

python3 -c 'import json, sys; p, b = float(sys.argv[1]), float(sys.argv[2]); print(json.dumps({"bench": "build_overhead", "value": p, "unit": "s", "baseline": b, "ratio": round(p / b, 2)}))' \
    "$patch_s" "$plain_s"
