#!/usr/bin/env bash
# Run the Ansible integration targets (tests/integration/targets/*/runme.sh) against this
# machine, with this tree visible as the collection libcare.livepatch (build/collections).
# Usage: tests/ansible/run-integration.sh [target...]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# shellcheck source=tests/ansible/collection-env.sh
. tests/ansible/collection-env.sh
export PATH=$ROOT/.venv/bin:$PATH
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for runme in tests/integration/targets/*/runme.sh; do
        targets+=("$(basename "$(dirname "$runme")")")
    done
fi
status=0
for target in "${targets[@]}"; do
    start=$(date +%s)
    if "tests/integration/targets/$target/runme.sh"; then
        echo "[run-integration] $target: passed in $(( $(date +%s) - start )) s"
    else
        echo "[run-integration] $target: FAILED" >&2
        status=1
    fi
done
exit $status
