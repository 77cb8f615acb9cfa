#!/usr/bin/env bash
# Install what the molecule scenarios need and build their image, offline-capable later:
#   - Debian: podman, runc, catatonit, debootstrap
#   - .venv: molecule + the podman driver, and the containers.podman collection
#     (unpacked from the PyPI `ansible` bundle: Galaxy is not reachable)
#   - .cache/wheels: wheels of the engine's target dependencies (the apply_patch role
#     installs them on targets without network)
#   - the image localhost/libcare-debian:12, built once with debootstrap (reused when present)
#   - localhost/libcare-debian-systemd:12, that image plus systemd (the watch scenario)
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
CACHE=$ROOT/.cache
IMAGE=${LIBCARE_IMAGE:-localhost/libcare-debian:12}
SYSTEMD_IMAGE=${LIBCARE_SYSTEMD_IMAGE:-localhost/libcare-debian-systemd:12}
export CONTAINERS_CONF=$ROOT/extensions/molecule/containers.conf
APT=(env DEBIAN_FRONTEND=noninteractive apt-get -y -o DPkg::Lock::Timeout=600)

log() { printf '[setup-containers] %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------------------
missing=()
for tool in podman runc catatonit debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/libexec/podman/$tool" ] || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    "${APT[@]}" update -qq
    "${APT[@]}" install -qq --no-install-recommends podman runc catatonit debootstrap
fi

# --- molecule into the venv ---------------------------------------------------------------
test -x "$PY" || { echo "no $PY: run 'make setup' first" >&2; exit 1; }
if ! "$PY" -c 'import molecule, molecule_plugins' 2>/dev/null; then
    log "pip install molecule"
    "$PY" -m pip install --quiet molecule==26.10.0 'molecule-plugins[podman]==26.10.12' ansible-core==2.19.14
fi

# --- containers.podman collection --------------------------------------------------------
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -f "$SITE/ansible_collections/containers/podman/MANIFEST.json" ]; then
    log "containers.podman from the PyPI ansible bundle"
    mkdir -p "$CACHE/ansible-bundle"
    ls "$CACHE"/ansible-bundle/ansible-12.3.0-*.whl >/dev/null 2>&1 \
        || "$PY" -m pip download --quiet --no-deps --dest "$CACHE/ansible-bundle" ansible==12.3.0
    "$PY" - "$CACHE"/ansible-bundle/ansible-12.3.0-*.whl "$SITE" <<'PYEOF'
import sys
import zipfile

wheel, site = sys.argv[1], sys.argv[2]
prefix = "ansible_collections/containers/podman/"
with zipfile.ZipFile(wheel) as archive:
    names = [n for n in archive.namelist() if n.startswith(prefix)]
    archive.extractall(site, names)
print(f"unpacked {len(names)} files of containers.podman")
PYEOF
fi

# --- wheels of the engine's target dependencies ----------------------------------------
mkdir -p "$CACHE/wheels"
mapfile -t target_requirements < <(grep -E '^(pyelftools|capstone|python-ptrace)==' requirements.txt)
if [ "$(find "$CACHE/wheels" -name '*.whl' | wc -l)" -lt "${#target_requirements[@]}" ]; then
    log "wheels for targets into .cache/wheels"
    "$PY" -m pip wheel --quiet --wheel-dir "$CACHE/wheels" "${target_requirements[@]}"
fi

# --- the image -----------------------------------------------------------------------------
if podman image exists "$IMAGE"; then
    log "image $IMAGE present"
else
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d /var/tmp/libcare-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm from $mirror (a few minutes)"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,gcc,libc6-dev,make,patch,binutils,elfutils,procps \
        bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
    log "image $IMAGE built"
fi

# --- the image with systemd (the watch scenario boots it as PID 1) --------------------------
# One cheap layer over the image above (~10 s), not a second debootstrap: apt-get inside a
# build container with the host's network (the containers themselves run without one).
if podman image exists "$SYSTEMD_IMAGE"; then
    log "image $SYSTEMD_IMAGE present"
else
    log "image $SYSTEMD_IMAGE: $IMAGE + systemd, systemd-sysv"
    podman build --quiet --network=host --build-arg "BASE=$IMAGE" -t "$SYSTEMD_IMAGE" \
        -f "$ROOT/tests/ansible/systemd.Containerfile" "$ROOT/tests/ansible" >/dev/null
    log "image $SYSTEMD_IMAGE built"
fi
