# shellcheck shell=bash disable=SC2034
# Shared settings of the real-project harness (sourced by the scripts here).
#
# The project: redis 7.0.15 as shipped by Debian 12 (source package "redis"),
# the fix: Debian's backport of upstream commit 6910256443c7 "Strip CRLF from
# error and simple string replies" (CVE-2025-67733, debian/patches/CVE-2025-67733.patch).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${LIBCARE_REALPROJECT_CACHE:-$ROOT/.cache/realproject}
SRC_PACKAGE=redis
FIX_NAME=CVE-2025-67733.patch
# Build settings shared by the plain build and libcare-patch-make: the libc
# allocator (the bundled jemalloc needs its own configure run and does not link
# with Debian's packaging patches), two jobs.
MAKE_ARGS=(MALLOC=libc)
# Compiler flag variants (all passed by hand, see README): upstream (default: -O2 -g),
# debian (dpkg-buildflags, hardening=+all), debian-cet (that + -fcf-protection=full), O3.
case "${LIBCARE_REALPROJECT_VARIANT:-upstream}" in
    upstream) ;;
    debian|debian-cet)
        flags="$(DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get CFLAGS)"
        flags+=" $(DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get CPPFLAGS)"
        [ "$LIBCARE_REALPROJECT_VARIANT" = debian-cet ] && flags+=" -fcf-protection=full"
        MAKE_ARGS+=("CFLAGS=$flags" "LDFLAGS=$(DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get LDFLAGS)")
        ;;
    O3) MAKE_ARGS+=(OPTIMIZATION=-O3) ;;
    *) echo "realproject: unknown LIBCARE_REALPROJECT_VARIANT=$LIBCARE_REALPROJECT_VARIANT" >&2; exit 1 ;;
esac
JOBS=${LIBCARE_REALPROJECT_JOBS:-2}

PRISTINE=$CACHE/pristine        # pre-fix tree, never built in
FIX_PATCH=$CACHE/fix.patch      # the fix, src/ only, -p1
PLAIN=$CACHE/plain              # plain build (baseline)
WORK=$CACHE/work                # the tree libcare-patch-make runs in
PREPARED_STAMP=$PRISTINE/.libcare-prepared

# redis' src/mkreleasehdr.sh puts `git diff | wc -l` of the enclosing repository
# into release.h (and recompiles release.c when it changes): keep git from
# finding the libcare checkout around the cache, or concurrent edits there would
# change data between the two builds.
export GIT_CEILING_DIRECTORIES=$CACHE
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

HARNESS=realproject
LOCK_VARIABLE=LIBCARE_REALPROJECT_LOCKED
SOURCE_VERSION=${LIBCARE_REALPROJECT_VERSION:-}    # default: the newest apt can fetch
# shellcheck source-path=SCRIPTDIR
source "$ROOT/tests/realproject/harness.sh"

PYTHON=$ROOT/.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python3
