# shellcheck shell=bash disable=SC2034
# Shared settings of the nginx real-project harness (sourced by the scripts here).
#
# The project: nginx 1.22.1 as shipped by Debian 12 (source package "nginx"),
# the fix: Debian's backport of upstream commit 524977e7c534 "Rewrite: fixed
# escaping and possible buffer overrun" (CVE-2026-42945,
# debian/patches/CVE-2026-42945.patch): one line in ngx_http_script_regex_end_code().

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CACHE=${LIBCARE_NGINX_CACHE:-$ROOT/.cache/realproject-nginx}
SRC_PACKAGE=nginx
FIX_NAME=CVE-2026-42945.patch
# Debian packages the build needs besides gcc, make, patch and dpkg-dev: the PCRE2
# headers (the rewrite module, where the fix is, is only compiled with PCRE).
BUILD_DEPS=(libpcre2-dev)
JOBS=${LIBCARE_NGINX_JOBS:-2}

# configure: upstream compiler flags (-O -g -Werror ...), the default install prefix
# (libcare-patch-make installs into lpmake/usr/local/nginx through DESTDIR; the test
# runs the server with -p <its own directory>), and only what a static file server
# with rewrite rules needs: no zlib, no OpenSSL, no proxying modules.
NGINX_PREFIX=/usr/local/nginx
CONFIGURE_ARGS=(
    --prefix="$NGINX_PREFIX"
    --without-http_gzip_module --without-http_ssi_module --without-http_userid_module
    --without-http_charset_module --without-http_access_module --without-http_auth_basic_module
    --without-http_mirror_module --without-http_autoindex_module --without-http_geo_module
    --without-http_map_module --without-http_split_clients_module --without-http_referer_module
    --without-http_proxy_module --without-http_fastcgi_module --without-http_uwsgi_module
    --without-http_scgi_module --without-http_grpc_module --without-http_memcached_module
    --without-http_limit_conn_module --without-http_limit_req_module --without-http_empty_gif_module
    --without-http_browser_module --without-http_upstream_hash_module
    --without-http_upstream_ip_hash_module --without-http_upstream_least_conn_module
    --without-http_upstream_random_module --without-http_upstream_keepalive_module
    --without-http_upstream_zone_module --without-http-cache
)
# Extra compiler and linker flags for both builds (e.g. "-O2", or Debian's
# dpkg-buildflags output; see README.md).
if [ -n "${LIBCARE_NGINX_CC_OPT:-}" ]; then
    CONFIGURE_ARGS+=(--with-cc-opt="$LIBCARE_NGINX_CC_OPT")
fi
if [ -n "${LIBCARE_NGINX_LD_OPT:-}" ]; then
    CONFIGURE_ARGS+=(--with-ld-opt="$LIBCARE_NGINX_LD_OPT")
fi

PRISTINE=$CACHE/pristine        # pre-fix tree, never built in
FIX_PATCH=$CACHE/fix.patch      # the fix, C hunks only, -p1
PLAIN=$CACHE/plain              # plain build (baseline)
WORK=$CACHE/work                # the tree libcare-patch-make runs in
PREPARED_STAMP=$PRISTINE/.libcare-prepared
SERVER_RELPATH=lpmake$NGINX_PREFIX/sbin/nginx   # the original-stage server, under $WORK

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

HARNESS=realproject-nginx
LOCK_VARIABLE=LIBCARE_NGINX_LOCKED
SOURCE_VERSION=${LIBCARE_NGINX_VERSION:-}          # default: the newest apt can fetch
# shellcheck source-path=SCRIPTDIR/..
source "$ROOT/tests/realproject/harness.sh"

PYTHON=$ROOT/.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python3
