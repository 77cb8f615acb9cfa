# shellcheck shell=bash
# What the real-project harnesses share (sourced by common.sh and nginx/common.sh once
# they have set HARNESS, LOCK_VARIABLE, CACHE, SRC_PACKAGE, SOURCE_VERSION, FIX_NAME,
# PRISTINE and ROOT): messages, the cache lock, fetching a Debian source package with the
# fix in its series, applying that series up to the fix, and the libcare-patch-make step.

log() { echo "$HARNESS: $*" >&2; }
die() { log "error: $*"; exit 1; }

# One user of the cache at a time (concurrent test runs share it): an exclusive flock
# on $CACHE/.lock, held until the script exits; children inherit it through the
# variable named by LOCK_VARIABLE (the pytest modules take it for their whole run).
lock_cache() {
    [ -z "${!LOCK_VARIABLE:-}" ] || return 0
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        log "waiting for another run to release $CACHE/.lock"
        flock -w 1200 9 || die "$CACHE is locked by another run"
    fi
    export "$LOCK_VARIABLE=1"
}

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }

# (sed reads all of apt-cache's output: with pipefail, grep -q could fail the pipeline
# by making apt-cache die of SIGPIPE.)
have_source() { [ -n "$(apt-cache showsrc "$SRC_PACKAGE" 2>/dev/null | sed -n "/^Package: $SRC_PACKAGE\$/p")" ]; }

enable_deb_src() {
    # One deb-src entry per Debian deb entry (deb822 and one-line formats), in files of
    # our own, written the same way by every harness.
    local out=/etc/apt/sources.list.d/libcare-deb-src.sources list=/etc/apt/sources.list.d/libcare-deb-src.list tmp f
    [ "$(id -u)" = 0 ] || { log "deb-src entries missing and not root"; exit 77; }
    tmp=$(mktemp)
    for f in /etc/apt/sources.list.d/*.sources; do
        if [ ! -f "$f" ] || [ "$f" = "$out" ]; then continue; fi
        awk 'BEGIN { RS = ""; ORS = "\n\n" }
             /(^|\n)Types:[^\n]*(^|[ \t])deb([ \t]|\n|$)/ && !/deb-src/ && /debian/ {
                 sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f" >> "$tmp"
    done
    if [ -f /etc/apt/sources.list ]; then
        grep -E '^deb [^#]*debian' /etc/apt/sources.list | sed 's/^deb /deb-src /' > "$list" || rm -f "$list"
    fi
    if [ -s "$tmp" ]; then
        install -m 0644 "$tmp" "$out"
    fi
    rm -f "$tmp"
    log "enabled deb-src entries; apt-get update"
    apt-get -o DPkg::Lock::Timeout=600 -qq update >&2 || true
}

# Exit 77 unless apt knows the source package (enabling deb-src entries if needed).
require_source_package() {
    have_source && return 0
    enable_deb_src
    have_source || { log "apt has no source package $SRC_PACKAGE"; exit 77; }
}

# unpack_source DSC: the tree without Debian's patches in $PRISTINE.tmp; fails if the
# download is incomplete or the series lacks the fix.
unpack_source() {
    rm -rf "$PRISTINE.tmp"
    local status=0
    dpkg-source --no-check --skip-patches -x "$1" "$PRISTINE.tmp" >/dev/null 2>&1 || status=$?
    # dpkg-source leaves a copy of the upstream tarball beside the tree.
    rm -f "$CACHE/${SRC_PACKAGE}"_*.orig.tar.*
    [ "$status" = 0 ] || { log "cannot unpack $(basename "$1")"; return 1; }
    grep -qx "$FIX_NAME" "$PRISTINE.tmp/debian/patches/series" || {
        log "$(basename "$1") has no $FIX_NAME in debian/patches/series"; return 1; }
}

# fetch_source: sets dsc to the unpacked source package in $CACHE/dl (reused when it is
# there and sound). Version: $SOURCE_VERSION if set, else every version apt knows, newest
# first, until one downloads and has the fix in its series (an apt index can name a
# security update whose files are gone from the mirror). Exit 77 if none can be fetched.
fetch_source() {
    local versions version candidate reason downloaded=
    rm -rf "$PRISTINE" "$PRISTINE.tmp"
    dsc=$(ls "$CACHE"/dl/"${SRC_PACKAGE}"_*.dsc 2>/dev/null | head -n1 || true)
    if [ -n "$dsc" ] && unpack_source "$dsc"; then
        return 0
    fi
    rm -rf "$CACHE/dl"
    dsc=
    if [ -n "$SOURCE_VERSION" ]; then
        versions=$SOURCE_VERSION
    else
        versions=$(apt-cache showsrc "$SRC_PACKAGE" | sed -n 's/^Version: *//p' | sort -u -r -V)
    fi
    local apt_log=$CACHE/apt-source.log left
    left=$(wc -w <<<"$versions")
    for version in $versions; do
        left=$((left - 1))
        rm -rf "$CACHE/dl.tmp"
        mkdir -p "$CACHE/dl.tmp"
        log "downloading the source of $SRC_PACKAGE $version (apt-get source --download-only)"
        # apt's own messages go to a log: an index can list a version whose files are gone
        # from the mirror (a 404), which is expected and handled by trying an older one.
        if ! (cd "$CACHE/dl.tmp" && apt-get -qq source --download-only "$SRC_PACKAGE=$version" >"$apt_log" 2>&1); then
            if grep -q '404' "$apt_log"; then
                reason="apt lists it, but its files are no longer on the mirror"
            else
                reason="apt-get failed: $(grep -v '^\s*$' "$apt_log" | tail -n1)"
            fi
            if [ "$left" -gt 0 ]; then
                log "$SRC_PACKAGE $version cannot be downloaded ($reason); falling back to the next older version"
            else
                log "$SRC_PACKAGE $version cannot be downloaded ($reason; apt's output: $apt_log)"
            fi
            continue
        fi
        candidate=$(ls "$CACHE"/dl.tmp/"${SRC_PACKAGE}"_*.dsc 2>/dev/null | head -n1 || true)
        [ -n "$candidate" ] || continue
        downloaded+=" $version"
        unpack_source "$candidate" || continue
        mv "$CACHE/dl.tmp" "$CACHE/dl"
        dsc=$CACHE/dl/$(basename "$candidate")
        log "using the source of $SRC_PACKAGE $version"
        return 0
    done
    rm -rf "$CACHE/dl.tmp" "$PRISTINE.tmp"
    [ -z "$downloaded" ] || die "no version of $SRC_PACKAGE with $FIX_NAME in its series (fetched:$downloaded)"
    log "no version of $SRC_PACKAGE (${versions//$'\n'/ }) could be fetched"
    exit 77
}

# apply_series_before_fix: Debian's patches in $PRISTINE.tmp in series order, stopping
# before the fix; sets applied to their count.
apply_series_before_fix() {
    local name
    applied=0
    while read -r name _; do
        case "$name" in ''|'#'*) continue ;; esac
        [ "$name" = "$FIX_NAME" ] && break
        patch -d "$PRISTINE.tmp" -p1 -s --batch --no-backup-if-mismatch -i "debian/patches/$name" \
            || die "debian patch $name does not apply"
        applied=$((applied + 1))
    done < "$PRISTINE.tmp/debian/patches/series"
}

# prepare_up_to_fix: exit 0 if already prepared; else fetch the source and apply Debian's
# series up to the fix in $PRISTINE.tmp (the caller writes $FIX_PATCH.tmp, then finish_prepare).
prepare_up_to_fix() {
    if [ -f "$PREPARED_STAMP" ] && [ -s "$FIX_PATCH" ]; then
        log "already prepared: $PRISTINE ($(cat "$PREPARED_STAMP"))"
        exit 0
    fi
    require_source_package
    fetch_source
    log "unpacked $(basename "$dsc") without its patches"
    apply_series_before_fix
}

# finish_prepare: check that $FIX_PATCH.tmp applies to the pre-fix tree, then put the
# fix and the tree in place (the stamp says what was prepared).
finish_prepare() {
    patch -d "$PRISTINE.tmp" -p1 --dry-run -s --batch -i "$FIX_PATCH.tmp" >/dev/null \
        || die "the fix made from $FIX_NAME does not apply to the pre-fix tree"
    mv "$FIX_PATCH.tmp" "$FIX_PATCH"
    echo "$(basename "$dsc" .dsc): $applied debian patches applied, stopped before $FIX_NAME" \
        > "$PRISTINE.tmp/.libcare-prepared"
    mv "$PRISTINE.tmp" "$PRISTINE"
    log "prepared $PRISTINE; fix in $FIX_PATCH"
}

# run_patch_make ARG...: libcare-patch-make ARG... $FIX_PATCH in $WORK, timed into patch_s;
# its output goes to stderr and $CACHE/patch-make.{out,err}.
run_patch_make() {
    local t0
    log "libcare-patch-make $* $FIX_PATCH (in $WORK)"
    t0=$(now)
    if ! (cd "$WORK" && "$ROOT/bin/libcare-patch-make" "$@" "$FIX_PATCH") \
            > "$CACHE/patch-make.out" 2> "$CACHE/patch-make.err"; then
        cat "$CACHE/patch-make.out" >&2
        tail -n 80 "$CACHE/patch-make.err" >&2
        die "libcare-patch-make failed (stderr: $CACHE/patch-make.err, make logs: $WORK/.lpmaketmp/)"
    fi
    patch_s=$(elapsed "$t0" "$(now)")
    cat "$CACHE/patch-make.err" "$CACHE/patch-make.out" >&2
    log "libcare-patch-make: ${patch_s}s"
}

# find_patch SERVER: sets build_id to SERVER's GNU build-id and kpatch to the patch
# libcare-patch-make wrote for it in $WORK/patchroot.
find_patch() {
    [ -x "$1" ] || die "no $1: the original-stage install did not install the server"
    build_id=$(readelf -n "$1" | sed -n 's/^ *Build ID: *\([0-9a-f]*\).*/\1/p' | head -n1)
    [ -n "$build_id" ] || die "$1 has no GNU build-id"
    kpatch=$WORK/patchroot/$build_id.kpatch
    [ -s "$kpatch" ] || die "no patch for $1 (build-id $build_id) in $WORK/patchroot: $(ls "$WORK/patchroot" 2>&1)"
}

# prepare_or_exit DIR: the cache lock, then DIR/prepare.sh; its exit status 77 (sources
# unavailable) or any failure ends the calling build_patch.sh with that status.
prepare_or_exit() {
    lock_cache
    local status=0
    "$1/prepare.sh" || status=$?
    [ "$status" = 0 ] || exit "$status"
}

# fresh_copy DIR: DIR becomes a copy of the pre-fix tree.
fresh_copy() {
    rm -rf "$1"
    cp -a "$PRISTINE" "$1"
}

# timed_plain_build LOG COMMAND...: COMMAND run in $PLAIN (already copied and configured),
# its output in $CACHE/LOG, timed into plain_s: the baseline of the overhead figure.
timed_plain_build() {
    local log_file=$CACHE/$1 t0
    shift
    log "plain build in $PLAIN: $*"
    t0=$(now)
    if ! (cd "$PLAIN" && "$@") > "$log_file" 2>&1; then
        tail -n 40 "$log_file" >&2
        die "plain build failed (log: $log_file)"
    fi
    plain_s=$(elapsed "$t0" "$(now)")
    log "plain build: ${plain_s}s"
}

# find_library_patch FILE: like find_patch, for a library installed without the
# executable bit (FILE relative to $WORK).
find_library_patch() {
    [ -f "$WORK/$1" ] || die "no $WORK/$1: the original-stage install did not install it"
    build_id=$(readelf -n "$WORK/$1" | sed -n 's/^ *Build ID: *\([0-9a-f]*\).*/\1/p' | head -n1)
    kpatch=$WORK/patchroot/$build_id.kpatch
    { [ -n "$build_id" ] && [ -s "$kpatch" ]; } || die "no patch for $1 (build-id $build_id) in $WORK/patchroot"
    log "patch for $1: $kpatch"
}

# print_overhead NAME: the benchmark's JSON line (libcare-patch-make seconds against the
# plain build's) on stdout.
print_overhead() {
    python3 -c 'import json, sys; n, p, b = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]); print(json.dumps({"bench": n, "value": p, "unit": "s", "baseline": b, "ratio": round(p / b, 2)}))' \
        "$1" "$patch_s" "$plain_s"
}
