#!/usr/bin/env bash
# Run a molecule scenario on real podman containers, with the project's podman
# configuration (extensions/molecule/containers.conf, through CONTAINERS_CONF).
# Prerequisite: tests/ansible/setup-containers.sh (podman, molecule, wheels, image).
# Usage: tests/ansible/run-molecule.sh [scenario] [molecule test options...]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
scenario=${1:-default}
shift || true
export CONTAINERS_CONF=$ROOT/extensions/molecule/containers.conf
# molecule shells out to ansible-config and friends: use the project's venv
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
export ANSIBLE_FORCE_COLOR=${ANSIBLE_FORCE_COLOR:-0}
image=localhost/libcare-debian:12
[ "$scenario" = watch ] && image=localhost/libcare-debian-systemd:12
podman image exists "$image" || {
    echo "no image $image: run tests/ansible/setup-containers.sh" >&2
    exit 2
}
ls "$ROOT"/.cache/wheels/*.whl >/dev/null 2>&1 || {
    echo "no wheels in .cache/wheels: run tests/ansible/setup-containers.sh" >&2
    exit 2
}
start=$(date +%s)
status=0
molecule test --scenario-name "$scenario" "$@" || status=$?
echo "[run-molecule] scenario $scenario: exit $status in $(( $(date +%s) - start )) s"
exit $status
