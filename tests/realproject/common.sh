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

log() { echo "realproject: $*" >&2; }
die() { log "error: $*"; exit 1; }

# One user of the cache at a time (concurrent test runs share it): an exclusive
# flock on $CACHE/.lock, held until the script exits; children inherit it through
# LIBCARE_REALPROJECT_LOCKED (the pytest wrapper takes it for the whole module).
lock_cache() {
    [ -z "${LIBCARE_REALPROJECT_LOCKED:-}" ] || return 0
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        log "waiting for another run to release $CACHE/.lock"
        flock -w 1200 9 || die "$CACHE is locked by another run"
    fi
    export LIBCARE_REALPROJECT_LOCKED=1
}

PYTHON=$ROOT/.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python3
