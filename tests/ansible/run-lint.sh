#!/usr/bin/env bash
# ansible-lint (production profile) on the roles, playbooks and molecule scenarios.
# The collection is made visible to it through build/collections (a symlink to this tree),
# so FQCN references such as libcare.livepatch.livepatch resolve offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
link=$ROOT/build/collections/ansible_collections/libcare/livepatch
mkdir -p "$(dirname "$link")"
[ "$(readlink "$link" 2>/dev/null)" = "$ROOT" ] || ln -sfn "$ROOT" "$link"
export ANSIBLE_COLLECTIONS_PATH=$ROOT/build/collections
export ANSIBLE_HOME=$ROOT/.cache/ansible-lint-home
"$ROOT/.venv/bin/ansible-lint" --offline -c tests/ansible/ansible-lint.yml \
    roles/ playbooks/ extensions/molecule/ tests/integration/targets/ "$@"
