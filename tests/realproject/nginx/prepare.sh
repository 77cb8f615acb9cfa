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
# shellcheck disable=SC2154  # dsc, applied, build_id, kpatch, patch_s: set by harness.sh functions
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

prepare_up_to_fix

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
finish_prepare
