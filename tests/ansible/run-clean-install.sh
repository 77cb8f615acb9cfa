#!/usr/bin/env bash
# The collection as a user gets it: build the tarball with ansible-galaxy, install it into an
# empty ANSIBLE_COLLECTIONS_PATH (a temporary directory), and run the installed rollout
# playbook (libcare.livepatch.rollout, by its FQCN) from a directory outside the checkout
# against a podman container that is both the builder and the target. The checkout only
# provides the tarball and test inputs copied into the temporary directory: the demo
# program's sources and fix, and the wheels of the engine's dependencies (the container has
# no network, so the roles install them from that wheel directory).
#
# Checks: the tarball holds no development files; the collection resolves from the clean
# path only; the demo program, running as another uid, prints the fixed line afterwards with
# the same pid; a second rollout changes nothing.
# Prerequisite: tests/ansible/setup-containers.sh (podman, the image, the wheels).
# Usage: tests/ansible/run-clean-install.sh      Exit status: non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$ROOT/.venv
IMAGE=localhost/libcare-debian:12
export CONTAINERS_CONF=$ROOT/extensions/molecule/containers.conf
export ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
unset ANSIBLE_CONFIG ANSIBLE_COLLECTIONS_PATH ANSIBLE_COLLECTIONS_PATHS

log() { printf '[clean-install] %s\n' "$*"; }
fail() { printf '[clean-install] FAIL: %s\n' "$*" >&2; exit 1; }

podman image exists "$IMAGE" || { log "no image $IMAGE: run tests/ansible/setup-containers.sh"; exit 2; }
ls "$ROOT"/.cache/wheels/*.whl >/dev/null 2>&1 || { log "no wheels in .cache/wheels: run tests/ansible/setup-containers.sh"; exit 2; }

WORK=$(mktemp -d /tmp/libcare-clean-install.XXXXXX)
CONTAINER=libcare-clean-install-$$
cleanup() {
    podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
start=$(date +%s)

# --- the tarball, installed into an empty collections path --------------------------------
"$VENV/bin/ansible-galaxy" collection build --force --output-path "$WORK/dist" "$ROOT" >/dev/null
tarball=$(ls "$WORK"/dist/libcare-livepatch-*.tar.gz)
files=$(tar -tzf "$tarball" | grep -vc '/$')
log "tarball $(basename "$tarball"): $(stat -c %s "$tarball") bytes, $files files"
if tar -tzf "$tarball" | grep -E '^(\..*|bench|bin|build|demo|dist|extensions|tests|changelogs/fragments)/|^(Makefile|pyproject\.toml|requirements\.txt|packaging-debian\.txt)$'; then
    fail "the tarball holds the development files listed above"
fi
for wanted in LICENSE CHANGELOG.rst meta/runtime.yml meta/execution-environment.yml bindep.txt \
              playbooks/rollout.yml roles/apply_patch/tasks/main.yml plugins/modules/livepatch.py; do
    tar -tzf "$tarball" "$wanted" >/dev/null 2>&1 || fail "the tarball lacks $wanted"
done
export ANSIBLE_COLLECTIONS_PATH=$WORK/collections
"$VENV/bin/ansible-galaxy" collection install --offline -p "$ANSIBLE_COLLECTIONS_PATH" "$tarball" >/dev/null
installed=$("$VENV/bin/ansible-galaxy" collection list libcare.livepatch --format json)
[ "$(printf '%s' "$installed" | "$VENV/bin/python" -c 'import json, sys; print(" ".join(json.load(sys.stdin)))')" \
    = "$ANSIBLE_COLLECTIONS_PATH/ansible_collections" ] || fail "libcare.livepatch resolves from elsewhere: $installed"

# --- test inputs, outside the checkout ------------------------------------------------------
mkdir -p "$WORK/run/project" "$WORK/run/wheels"
cp "$ROOT"/demo/{Makefile,calc.c,demo.h,server.c,fix.patch} "$WORK/run/project/"
cp "$ROOT"/.cache/wheels/*.whl "$WORK/run/wheels/"
cat >"$WORK/run/inventory.ini" <<EOF
[builders]
$CONTAINER

[targets]
$CONTAINER

[all:vars]
ansible_connection=containers.podman.podman
ansible_python_interpreter=/usr/bin/python3
EOF
cat >"$WORK/run/vars.yml" <<EOF
---
rollout_controller_dir: $WORK/run/controller
rollout_serial: [1]
build_patch_source_src: $WORK/run/project
build_patch_patches: [$WORK/run/project/fix.patch]
build_patch_packages: []
build_patch_wheels_src: $WORK/run/wheels
apply_patch_packages: []
apply_patch_wheels_src: $WORK/run/wheels
apply_patch_store_src: $WORK/run/controller/store
rollout_health_command: sh -c 'tail -n 1 /var/tmp/libcare-demo.log | grep -q "= 5\$"'
EOF
# Before the rollout the program must run: build it on the builder with the installed role,
# install it on the target (the container's main process then starts it as uid 1234).
cat >"$WORK/run/prepare.yml" <<'EOF'
---
- name: Build the demo program with the installed collection and start it on the target
  hosts: targets
  gather_facts: false
  tasks:
    - name: Build with the installed build_patch role
      ansible.builtin.include_role:
        name: libcare.livepatch.build_patch
      vars:
        build_patch_controller_dir: "{{ rollout_controller_dir }}"
    - name: Create the demo user
      ansible.builtin.user:
        name: demo
        uid: 1234
        system: true
        create_home: false
    - name: Install the built program (the container starts it)
      ansible.builtin.copy:
        src: "{{ rollout_controller_dir }}/objects/libcare-demo"
        dest: /usr/local/bin/libcare-demo
        mode: "0755"
    - name: Wait for its buggy output
      ansible.builtin.wait_for:
        path: /var/tmp/libcare-demo.log
        search_regex: "= -1"
        timeout: 20
EOF

# --- the target ---------------------------------------------------------------------------
# SYS_PTRACE: the program runs as another uid. seccomp=unconfined: the engine checks a
# patient's seccomp filter before stopping it (process/seccomp.py), which the kernel only lets
# a tracer outside seccomp with CAP_SYS_ADMIN read; podman's default profile filters both.
podman run -d --name "$CONTAINER" --cap-add SYS_PTRACE --security-opt seccomp=unconfined --network none --init \
    "$IMAGE" /bin/sh -c \
    'until [ -x /usr/local/bin/libcare-demo ]; do sleep 0.2; done;
     exec setpriv --reuid=1234 --regid=1234 --clear-groups /usr/local/bin/libcare-demo 100 >/var/tmp/libcare-demo.log 2>&1' \
    >/dev/null

demo_state() { podman exec "$CONTAINER" sh -c 'tail -n 1 /var/tmp/libcare-demo.log; ps -o user=,pid= -C libcare-demo'; }
# Poll (up to 20 s) until the program's latest line is $1; print its "user pid".
wait_line() {
    local state
    for _ in $(seq 100); do
        state=$(demo_state)
        if [ "$(sed -n 1p <<<"$state")" = "$1" ]; then sed -n 2p <<<"$state"; return 0; fi
        sleep 0.2
    done
    fail "the demo prints '$(sed -n 1p <<<"$state")', expected '$1'"
}

cd "$WORK/run"
log "prepare: build and start the demo program with the installed collection"
"$VENV/bin/ansible-playbook" -i inventory.ini -e @vars.yml prepare.yml >"$WORK/prepare.log" 2>&1 \
    || { cat "$WORK/prepare.log"; fail "prepare failed"; }
before=$(wait_line "libcare-demo: 2 + 3 = -1")
log "before: $before prints '2 + 3 = -1'"

log "rollout: ansible-playbook libcare.livepatch.rollout"
"$VENV/bin/ansible-playbook" -i inventory.ini -e @vars.yml libcare.livepatch.rollout >"$WORK/rollout.log" 2>&1 \
    || { cat "$WORK/rollout.log"; fail "the rollout failed"; }
after=$(wait_line "libcare-demo: 2 + 3 = 5")
[ "$after" = "$before" ] || fail "the program changed: '$before' before, '$after' after"
[ "${after%% *}" = demo ] || fail "the program does not run as the demo user: '$after'"
log "after: $after prints '2 + 3 = 5' (same process)"

log "rollout again: nothing changes"
"$VENV/bin/ansible-playbook" -i inventory.ini -e @vars.yml libcare.livepatch.rollout >"$WORK/again.log" 2>&1 \
    || { cat "$WORK/again.log"; fail "the second rollout failed"; }
grep -Eq "^$CONTAINER +: ok=[0-9]+ +changed=0 " "$WORK/again.log" || { cat "$WORK/again.log"; fail "the second rollout changed something"; }

log "PASS in $(( $(date +%s) - start )) s"
