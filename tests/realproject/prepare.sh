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
# Which source version: $LIBCARE_REALPROJECT_VERSION if set, else the newest apt can fetch
# that has the fix in its series (harness.sh: fetch_source).
# Exit status 77: the sources cannot be fetched (no deb-src, no network, not root).
# shellcheck disable=SC2154  # dsc, applied, build_id, kpatch, patch_s: set by harness.sh functions
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
lock_cache

prepare_up_to_fix
# The fix without its test-suite hunks (tests/ is not part of the build).
awk '/^diff --git /{ keep = ($3 ~ /^a\/src\//) } keep' \
    "$PRISTINE.tmp/debian/patches/$FIX_NAME" > "$FIX_PATCH.tmp"
grep -q '^+++ b/src/' "$FIX_PATCH.tmp" || die "no src/ hunks in $FIX_NAME"
finish_prepare
