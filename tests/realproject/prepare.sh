#!/bin/bash
# Prepare the real project: Debian 12's redis source with its CVE-2025-67733 fix
# taken back out.
#
#   tests/realproject/prepare.sh        (cache: $LIBCARE_REALPROJECT_CACHE or .cache/realproject)
#
# Idempotent. Leaves:
#   $CACHE/pristine/   the source as Debian ships it up to (not including) the fix:
#                      debian/patches/series applied in order, stopping before
#                      CVE-2025-67733.patch
#   $CACHE/fix.patch   the fix as a standalone -p1 unified diff (its src/ hunks;
#                      the test-suite hunks are dropped: they are not built)
# Exit status 77: the sources cannot be fetched (no deb-src, no network, not root).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
lock_cache

if [ -f "$PREPARED_STAMP" ] && [ -s "$FIX_PATCH" ]; then
    log "already prepared: $PRISTINE ($(cat "$PREPARED_STAMP"))"
    exit 0
fi

have_source() { apt-cache showsrc "$SRC_PACKAGE" 2>/dev/null | grep -c "^Package: $SRC_PACKAGE\$" >/dev/null; }

enable_deb_src() {
    # One deb-src entry per existing deb entry (deb822 and one-line formats).
    local out=/etc/apt/sources.list.d/libcare-deb-src.sources tmp
    [ "$(id -u)" = 0 ] || { log "deb-src entries missing and not root"; exit 77; }
    tmp=$(mktemp)
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && [ "$f" != "$out" ] || continue
        awk 'BEGIN { RS = ""; ORS = "\n\n" }
             /(^|\n)Types:[^\n]*(^|[ \t])deb([ \t]|\n|$)/ && !/deb-src/ && /debian/ {
                 sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f" >> "$tmp"
    done
    if [ -f /etc/apt/sources.list ]; then
        grep -E '^deb [^#]*debian' /etc/apt/sources.list | sed 's/^deb /deb-src /' \
            > /etc/apt/sources.list.d/libcare-deb-src.list || rm -f /etc/apt/sources.list.d/libcare-deb-src.list
    fi
    if [ -s "$tmp" ]; then
        cp "$tmp" "$out"
    fi
    rm -f "$tmp"
    log "enabled deb-src entries; apt-get update"
    apt-get -o DPkg::Lock::Timeout=600 -qq update >&2 || true
}

if ! have_source; then
    enable_deb_src
    have_source || { log "apt has no source package $SRC_PACKAGE"; exit 77; }
fi

mkdir -p "$CACHE/dl"
dsc=$(ls "$CACHE"/dl/"${SRC_PACKAGE}"_*.dsc 2>/dev/null | head -n1 || true)
if [ -z "$dsc" ]; then
    log "apt-get source --download-only $SRC_PACKAGE"
    (cd "$CACHE/dl" && apt-get -qq source --download-only "$SRC_PACKAGE" >&2) || {
        log "apt-get source failed"; rm -rf "$CACHE/dl"; exit 77; }
    dsc=$(ls "$CACHE"/dl/"${SRC_PACKAGE}"_*.dsc | head -n1)
fi

rm -rf "$PRISTINE" "$PRISTINE.tmp"
log "unpacking $(basename "$dsc") without its patches"
if ! dpkg-source --no-check --skip-patches -x "$dsc" "$PRISTINE.tmp" >/dev/null; then
    # A download cut short: fetch again once.
    rm -rf "$CACHE/dl" "$PRISTINE.tmp"
    mkdir -p "$CACHE/dl"
    (cd "$CACHE/dl" && apt-get -qq source --download-only "$SRC_PACKAGE" >&2) || {
        log "apt-get source failed"; rm -rf "$CACHE/dl"; exit 77; }
    dsc=$(ls "$CACHE"/dl/"${SRC_PACKAGE}"_*.dsc | head -n1)
    dpkg-source --no-check --skip-patches -x "$dsc" "$PRISTINE.tmp" >/dev/null || die "cannot unpack $dsc"
fi
series=$PRISTINE.tmp/debian/patches/series
grep -qx "$FIX_NAME" "$series" || die "$(basename "$dsc") has no $FIX_NAME in debian/patches/series"
applied=0
while read -r name _; do
    case "$name" in ''|'#'*) continue ;; esac
    [ "$name" = "$FIX_NAME" ] && break
    patch -d "$PRISTINE.tmp" -p1 -s --batch --no-backup-if-mismatch -i "debian/patches/$name" \
        || die "debian patch $name does not apply"
    applied=$((applied + 1))
done < "$series"
# The fix without its test-suite hunks (tests/ is not part of the build).
awk '/^diff --git /{ keep = ($3 ~ /^a\/src\//) } keep' \
    "$PRISTINE.tmp/debian/patches/$FIX_NAME" > "$FIX_PATCH.tmp"
grep -q '^+++ b/src/' "$FIX_PATCH.tmp" || die "no src/ hunks in $FIX_NAME"
patch -d "$PRISTINE.tmp" -p1 --dry-run -s --batch -i "$FIX_PATCH.tmp" >/dev/null \
    || die "$FIX_NAME does not apply to the pre-fix tree"
mv "$FIX_PATCH.tmp" "$FIX_PATCH"
echo "$(basename "$dsc" .dsc): $applied debian patches applied, stopped before $FIX_NAME" \
    > "$PRISTINE.tmp/.libcare-prepared"
mv "$PRISTINE.tmp" "$PRISTINE"
log "prepared $PRISTINE; fix in $FIX_PATCH"
