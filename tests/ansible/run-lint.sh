#!/usr/bin/env bash
# ansible-lint (production profile) on the roles, playbooks and molecule scenarios.
# The collection is made visible to it through build/collections (a symlink to this tree),
# so FQCN references such as libcare.livepatch.livepatch resolve offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# shellcheck source=tests/ansible/collection-env.sh
. tests/ansible/collection-env.sh
export ANSIBLE_HOME=$ROOT/.cache/ansible-lint-home
"$ROOT/.venv/bin/ansible-lint" --offline -c tests/ansible/ansible-lint.yml \
    roles/ playbooks/ extensions/molecule/ tests/integration/targets/ "$@"
