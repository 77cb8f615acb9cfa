#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Prepare the CMake real project: Debian 12's cJSON source with its CVE-2025-57052 fix
# taken back out.
#
#   tests/realproject/cjson/prepare.sh   (cache: $LIBCARE_CJSON_CACHE or .cache/cjson)
#
# Idempotent. Leaves $CACHE/pristine/ (debian/patches/series applied in order, stopping
# before CVE-2025-57052.patch) and $CACHE/fix.patch (that patch, -p1).
# Exit status 77: the sources cannot be fetched (no deb-src, no network, not root).
# shellcheck disable=SC2154  # dsc, applied: set by harness.sh functions
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
lock_cache

prepare_up_to_fix
cp "$PRISTINE.tmp/debian/patches/$FIX_NAME" "$FIX_PATCH.tmp"
grep -q '^+++ [^/]*/cJSON_Utils.c' "$FIX_PATCH.tmp" || die "$FIX_NAME does not change cJSON_Utils.c"
finish_prepare
