#!/usr/bin/env bash
# ansible-lint (production profile) at the repository root: the whole collection, Galaxy rules included.
# The collection is made visible to it through build/collections (a symlink to this tree),
# so FQCN references such as libcare.livepatch.livepatch resolve offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# shellcheck source=tests/ansible/collection-env.sh
. tests/ansible/collection-env.sh
export ANSIBLE_HOME=$ROOT/.cache/ansible-lint-home
# No paths: at the repository root ansible-lint sees galaxy.yml and lints the whole collection,
# the Galaxy rules (galaxy[...]: changelog, version, tags) included.
"$ROOT/.venv/bin/ansible-lint" --offline -c tests/ansible/ansible-lint.yml "$@"
