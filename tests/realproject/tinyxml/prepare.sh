#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Prepare the C++ real project: Debian 12's TinyXML source with its CVE-2023-34194 fix
# taken back out.
#
#   tests/realproject/tinyxml/prepare.sh   (cache: $LIBCARE_TINYXML_CACHE or .cache/tinyxml)
#
# Idempotent. Leaves $CACHE/pristine/ (debian/patches/series applied in order, stopping
# before CVE-2023-34194.patch) and $CACHE/fix.patch (that patch, -p1).
# Exit status 77: the sources cannot be fetched (no deb-src, no network, not root).
# shellcheck disable=SC2154  # dsc: set by harness.sh functions
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
lock_cache

prepare_up_to_fix
cp "$PRISTINE.tmp/debian/patches/$FIX_NAME" "$FIX_PATCH.tmp"
grep -q '^+++ [^/]*/tinyxmlparser.cpp' "$FIX_PATCH.tmp" || die "$FIX_NAME does not change tinyxmlparser.cpp"
finish_prepare
