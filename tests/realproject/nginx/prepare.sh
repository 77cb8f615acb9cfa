#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Prepare the nginx real project: Debian 12's nginx source with its CVE-2026-42945 fix
# taken back out.
#
#   tests/realproject/nginx/prepare.sh   (cache: $LIBCARE_NGINX_CACHE or .cache/realproject-nginx)
#
# Idempotent. Leaves:
#   $CACHE/pristine/   the source as Debian ships it up to (not including) the fix:
#                      debian/patches/series applied in order, stopping before
#                      CVE-2026-42945.patch
#   $CACHE/fix.patch   the fix as a standalone -p1 unified diff of its C files
#                      (made with diff -up from the pre-fix and the fixed file)
# Installs the missing build dependencies ($BUILD_DEPS in common.sh) with apt-get.
# Which source version: $LIBCARE_NGINX_VERSION if set, else every version apt knows,
# newest first, until one downloads and has the fix in its series (an apt index can
# name a security update whose files are gone from the mirror).
# Exit status 77: the sources cannot be fetched (no deb-src, no network, not root).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
lock_cache

install_build_deps() {
    local missing=() pkg
    for pkg in "${BUILD_DEPS[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$pkg")
    done
    [ "${#missing[@]}" = 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "build dependencies missing and not root: ${missing[*]}"
    log "apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends install "${missing[@]}" >&2 \
        || die "cannot install the build dependencies: ${missing[*]}"
}

install_build_deps

if [ -f "$PREPARED_STAMP" ] && [ -s "$FIX_PATCH" ]; then
    log "already prepared: $PRISTINE ($(cat "$PREPARED_STAMP"))"
    exit 0
fi

# (sed reads all of apt-cache's output: with pipefail, grep -q could fail the pipeline
# by making apt-cache die of SIGPIPE.)
have_source() { [ -n "$(apt-cache showsrc "$SRC_PACKAGE" 2>/dev/null | sed -n "/^Package: $SRC_PACKAGE\$/p")" ]; }

enable_deb_src() {
    # One deb-src entry per Debian deb entry (deb822 and one-line formats), in the same
    # files the redis harness (tests/realproject/prepare.sh) writes, so the two never
    # add the same entry twice.
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

if ! have_source; then
    enable_deb_src
    have_source || { log "apt has no source package $SRC_PACKAGE"; exit 77; }
fi

# unpack DSC: the tree without Debian's patches in $PRISTINE.tmp; fails if the
# download is incomplete or the series lacks the fix.
unpack() {
    rm -rf "$PRISTINE.tmp"
    local status=0
    dpkg-source --no-check --skip-patches -x "$1" "$PRISTINE.tmp" >/dev/null 2>&1 || status=$?
    # dpkg-source leaves a copy of the upstream tarball beside the tree.
    rm -f "$CACHE/${SRC_PACKAGE}"_*.orig.tar.*
    [ "$status" = 0 ] || { log "cannot unpack $(basename "$1")"; return 1; }
    grep -qx "$FIX_NAME" "$PRISTINE.tmp/debian/patches/series" || {
        log "$(basename "$1") has no $FIX_NAME in debian/patches/series"; return 1; }
}

rm -rf "$PRISTINE" "$PRISTINE.tmp"
dsc=$(ls "$CACHE"/dl/"${SRC_PACKAGE}"_*.dsc 2>/dev/null | head -n1 || true)
if [ -n "$dsc" ] && ! unpack "$dsc"; then
    rm -rf "$CACHE/dl"
    dsc=
fi
if [ -z "$dsc" ]; then
    if [ -n "${LIBCARE_NGINX_VERSION:-}" ]; then
        versions=$LIBCARE_NGINX_VERSION
    else
        versions=$(apt-cache showsrc "$SRC_PACKAGE" | sed -n 's/^Version: *//p' | sort -u -r -V)
    fi
    downloaded=
    for version in $versions; do
        rm -rf "$CACHE/dl.tmp"
        mkdir -p "$CACHE/dl.tmp"
        log "apt-get source --download-only $SRC_PACKAGE=$version"
        if ! (cd "$CACHE/dl.tmp" && apt-get -qq source --download-only "$SRC_PACKAGE=$version" >&2); then
            log "apt-get source $SRC_PACKAGE=$version failed"
            continue
        fi
        candidate=$(ls "$CACHE"/dl.tmp/"${SRC_PACKAGE}"_*.dsc 2>/dev/null | head -n1 || true)
        [ -n "$candidate" ] || continue
        downloaded+=" $version"
        unpack "$candidate" || continue
        rm -rf "$CACHE/dl"
        mv "$CACHE/dl.tmp" "$CACHE/dl"
        dsc=$CACHE/dl/$(basename "$candidate")
        break
    done
    rm -rf "$CACHE/dl.tmp"
    if [ -z "$dsc" ]; then
        rm -rf "$PRISTINE.tmp"
        [ -z "$downloaded" ] || die "no version of $SRC_PACKAGE with $FIX_NAME in its series (fetched:$downloaded)"
        log "no version of $SRC_PACKAGE (${versions//$'\n'/ }) could be fetched"
        exit 77
    fi
fi
log "unpacked $(basename "$dsc") without its patches"

series=$PRISTINE.tmp/debian/patches/series
applied=0
while read -r name _; do
    case "$name" in ''|'#'*) continue ;; esac
    [ "$name" = "$FIX_NAME" ] && break
    patch -d "$PRISTINE.tmp" -p1 -s --batch --no-backup-if-mismatch -i "debian/patches/$name" \
        || die "debian patch $name does not apply"
    applied=$((applied + 1))
done < "$series"

# The fix as a plain diff of the C files it touches, from the pre-fix file and that
# file with Debian's patch applied (drops the mail header and trailer).
files=$(sed -n 's|^+++ [^/]*/\([^[:space:]]*\.[ch]\)\([[:space:]].*\)\{0,1\}$|\1|p' \
        "$PRISTINE.tmp/debian/patches/$FIX_NAME" | sort -u)
[ -n "$files" ] || die "no C files in $FIX_NAME"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for f in $files; do
    mkdir -p "$scratch/$(dirname "$f")"
    cp "$PRISTINE.tmp/$f" "$scratch/$f"
done
patch -d "$scratch" -p1 -s --batch --no-backup-if-mismatch -i "$PRISTINE.tmp/debian/patches/$FIX_NAME" \
    || die "$FIX_NAME does not apply to the pre-fix tree"
: > "$FIX_PATCH.tmp"
for f in $files; do
    status=0
    diff -up --label "a/$f" --label "b/$f" "$PRISTINE.tmp/$f" "$scratch/$f" >> "$FIX_PATCH.tmp" || status=$?
    [ "$status" = 1 ] || die "$FIX_NAME does not change $f (diff exit $status)"
done
patch -d "$PRISTINE.tmp" -p1 --dry-run -s --batch -i "$FIX_PATCH.tmp" >/dev/null \
    || die "fix.patch does not apply to the pre-fix tree"
mv "$FIX_PATCH.tmp" "$FIX_PATCH"
echo "$(basename "$dsc" .dsc): $applied debian patches applied, stopped before $FIX_NAME" \
    > "$PRISTINE.tmp/.libcare-prepared"
mv "$PRISTINE.tmp" "$PRISTINE"
log "prepared $PRISTINE; fix in $FIX_PATCH"
