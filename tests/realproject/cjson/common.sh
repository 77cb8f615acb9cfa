# shellcheck shell=bash disable=SC2034
# Shared settings of the cJSON harness (sourced by the scripts here).
#
# The project: cJSON 1.7.15 as shipped by Debian 12 (source package "cjson"), built with
# CMake (the tree also has a plain Makefile: --build-system cmake says which to use);
# the fix: Debian's backport of upstream's "fix the incorrect check in
# decode_array_index_from_pointer" (CVE-2025-57052, debian/patches/CVE-2025-57052.patch),
# in libcjson_utils.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CACHE=${LIBCARE_CJSON_CACHE:-$ROOT/.cache/cjson}
SRC_PACKAGE=cjson
FIX_NAME=CVE-2025-57052.patch
# As Debian builds it (dh's cmake: RelWithDebInfo-like -O2 -g), with cJSON_Utils, without
# the unit tests (not shipped).
CONFIGURE_ARGS=(-DENABLE_CJSON_UTILS=On -DENABLE_CJSON_TEST=Off -DCMAKE_BUILD_TYPE=RelWithDebInfo)
JOBS=${LIBCARE_CJSON_JOBS:-2}

PRISTINE=$CACHE/pristine        # pre-fix tree, never built in
FIX_PATCH=$CACHE/fix.patch      # the fix, -p1
PLAIN=$CACHE/plain              # plain build (baseline)
WORK=$CACHE/work                # the tree libcare-patch-make runs in
PREPARED_STAMP=$PRISTINE/.libcare-prepared
LIBRARY=lpmake/usr/local/lib/libcjson_utils.so.1.7.15

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

HARNESS=cjson
LOCK_VARIABLE=LIBCARE_CJSON_LOCKED
SOURCE_VERSION=${LIBCARE_CJSON_VERSION:-}    # default: the newest apt can fetch
# shellcheck source-path=SCRIPTDIR/..
source "$ROOT/tests/realproject/harness.sh"
