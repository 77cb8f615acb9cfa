#!/usr/bin/env bash
# Integration test of playbooks/rollout.yml and playbooks/rollback.yml on this machine:
# a healthy rollout patches the running demo program, rollback.yml removes the patch,
# a rollout whose health check fails rolls its batch back by itself and fails, and
# --check reports the patch without copying or patching anything.
# Runs as an ansible-test script target or directly (tests/ansible/run-integration.sh).
set -euo pipefail
cd "$(dirname "$0")"
ROLLOUT_REPO=$(cd ../../../.. && pwd)
export ROLLOUT_REPO
playbooks=$ROLLOUT_REPO/playbooks
ROLLOUT_WORK_DIR=$(mktemp -d /tmp/libcare-rollout.XXXXXX)
export ROLLOUT_WORK_DIR
demo_pid=
cleanup() {
    if [ -n "$demo_pid" ]; then kill "$demo_pid" 2>/dev/null || true; fi
    rm -rf "$ROLLOUT_WORK_DIR"
}
trap cleanup EXIT

playbook() { ansible-playbook -i inventory.ini -e @vars.yml "$@"; }

# The demo prints every 100 ms: wait 0.4 s, then poll up to 10 s (a loaded machine is slow).
expect_line() {
    local want=$1 got
    sleep 0.4
    for _ in $(seq 50); do
        got=$(tail -n 1 "$ROLLOUT_WORK_DIR/demo.log")
        if [ "$got" = "$want" ]; then
            echo "ok: the demo prints '$got'"
            return 0
        fi
        sleep 0.2
    done
    echo "FAIL: the demo prints '$got', expected '$want'" >&2
    exit 1
}

echo "== rollout --check before anything was built says what it would do and builds nothing"
playbook "$playbooks/rollout.yml" --check --diff | tee "$ROLLOUT_WORK_DIR/fresh-check.out"
grep -q "(check mode) would build the live patches" "$ROLLOUT_WORK_DIR/fresh-check.out"
grep -q "(check mode) present: the patch store .* has not been built yet" "$ROLLOUT_WORK_DIR/fresh-check.out"
for made in src store target-store controller/store; do
    test ! -e "$ROLLOUT_WORK_DIR/$made" || { echo "FAIL: --check made $made" >&2; exit 1; }
done

echo "== build the demo and its patch"
playbook build.yml
chmod 0755 "$ROLLOUT_WORK_DIR/controller/objects/libcare-demo"   # fetch keeps no modes
"$ROLLOUT_WORK_DIR/controller/objects/libcare-demo" 100 >"$ROLLOUT_WORK_DIR/demo.log" 2>&1 </dev/null &
demo_pid=$!
export ROLLOUT_DEMO_PID=$demo_pid
expect_line "libcare-demo: 2 + 3 = -1"

echo "== rollout --check --diff reports the patch and changes nothing"
check_dirs() { find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'libcare-check.*' | sort; }
check_dirs >"$ROLLOUT_WORK_DIR/check-dirs.before"
playbook "$playbooks/rollout.yml" --check --diff | tee "$ROLLOUT_WORK_DIR/check.out"
grep -q "(check mode) present: applied 1, skipped 0, removed 0, failed 0" "$ROLLOUT_WORK_DIR/check.out"
grep -q "^+libcare-demo\[$demo_pid\] .*: level 1$" "$ROLLOUT_WORK_DIR/check.out" \
    || { echo "FAIL: --diff does not show the patch to apply" >&2; exit 1; }
test ! -e "$ROLLOUT_WORK_DIR/target-store" || { echo "FAIL: --check copied the store" >&2; exit 1; }
check_dirs | cmp -s - "$ROLLOUT_WORK_DIR/check-dirs.before" \
    || { echo "FAIL: --check left its temporary directory behind" >&2; exit 1; }
expect_line "libcare-demo: 2 + 3 = -1"

echo "== rollout --check when the builder would rebuild says it cannot tell"
playbook "$playbooks/rollout.yml" --check -e '{"build_patch_make_args": ["CFLAGS=-O1 -g"]}' \
    | tee "$ROLLOUT_WORK_DIR/rebuild-check.out"
grep -q "(check mode) would build the live patches" "$ROLLOUT_WORK_DIR/rebuild-check.out"
grep -q "(check mode) present: the patch store .* would be rebuilt first" "$ROLLOUT_WORK_DIR/rebuild-check.out"
expect_line "libcare-demo: 2 + 3 = -1"

echo "== healthy rollout patches it"
playbook "$playbooks/rollout.yml" \
    -e "rollout_health_command='grep -q \"= 5\$\" $ROLLOUT_WORK_DIR/demo.log'"
expect_line "libcare-demo: 2 + 3 = 5"

echo "== a second rollout changes nothing"
playbook "$playbooks/rollout.yml" | tee "$ROLLOUT_WORK_DIR/second.out"
grep -q "localhost *: ok=[0-9]* *changed=0 " "$ROLLOUT_WORK_DIR/second.out"
expect_line "libcare-demo: 2 + 3 = 5"

echo "== rollback.yml removes it"
playbook "$playbooks/rollback.yml"
expect_line "libcare-demo: 2 + 3 = -1"

echo "== a rollout whose health check fails is rolled back and fails"
if playbook "$playbooks/rollout.yml" -e rollout_health_command=false -e rollout_health_retries=1 \
        >"$ROLLOUT_WORK_DIR/unhealthy.out" 2>&1; then
    cat "$ROLLOUT_WORK_DIR/unhealthy.out"
    echo "FAIL: the unhealthy rollout succeeded" >&2
    exit 1
fi
grep -q "was rolled back" "$ROLLOUT_WORK_DIR/unhealthy.out" || { cat "$ROLLOUT_WORK_DIR/unhealthy.out"; exit 1; }
grep -q "absent: applied 0, skipped 0, removed 1, failed 0" "$ROLLOUT_WORK_DIR/unhealthy.out" \
    || { cat "$ROLLOUT_WORK_DIR/unhealthy.out"; exit 1; }
expect_line "libcare-demo: 2 + 3 = -1"
echo "PASS"
