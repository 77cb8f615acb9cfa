# shellcheck shell=bash disable=SC2034
# Shared settings of the TinyXML harness (sourced by the scripts here).
#
# The project: TinyXML 2.6.2 as shipped by Debian 12 (source package "tinyxml"), C++,
# built as debian/rules builds its shared library (the upstream Makefile with
# -DTIXML_USE_STL -fPIC, then the three objects linked into libtinyxml.so.2.6.2); the fix:
# Debian's "avoid reachable assertion via crafted XML document with a '\0' located after
# whitespace" (CVE-2023-34194, debian/patches/CVE-2023-34194.patch), in
# TiXmlDeclaration::Parse, a C++ function with cleanups (its unwind records and
# exception table go into the patch).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CACHE=${LIBCARE_TINYXML_CACHE:-$ROOT/.cache/tinyxml}
SRC_PACKAGE=tinyxml
FIX_NAME=CVE-2023-34194.patch
JOBS=${LIBCARE_TINYXML_JOBS:-2}
# debian/rules' second (shared library) pass, with dpkg-buildflags' usual flags.
CXXFLAGS_DEBIAN="-g -O2 -fstack-protector-strong -Wformat -Werror=format-security -DTIXML_USE_STL -fPIC"
SONAME=libtinyxml.so.2.6.2
BUILD_CMD="make CXX=\"\$CXX\" LD=\"\$CXX\" CXXFLAGS=\"$CXXFLAGS_DEBIAN\" && \$CXX -shared -Wl,-soname,$SONAME -o $SONAME tinyxml.o tinyxmlparser.o tinyxmlerror.o"
INSTALL_CMD="install -D -m 755 $SONAME \"\$DESTDIR/usr/lib/$SONAME\" && install -D -m 644 tinyxml.h \"\$DESTDIR/usr/include/tinyxml.h\""

PRISTINE=$CACHE/pristine        # pre-fix tree, never built in
FIX_PATCH=$CACHE/fix.patch      # the fix, -p1
PLAIN=$CACHE/plain              # plain build (baseline)
WORK=$CACHE/work                # the tree libcare-patch-make runs in
PREPARED_STAMP=$PRISTINE/.libcare-prepared
LIBRARY=lpmake/usr/lib/$SONAME

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

HARNESS=tinyxml
LOCK_VARIABLE=LIBCARE_TINYXML_LOCKED
SOURCE_VERSION=${LIBCARE_TINYXML_VERSION:-}    # default: the newest apt can fetch
# shellcheck source-path=SCRIPTDIR/..
source "$ROOT/tests/realproject/harness.sh"
