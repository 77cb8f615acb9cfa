#!/usr/bin/env bash
# ansible-test sanity on the collection's Ansible layer, offline except for PyPI.
#
# ansible-test needs the tree at .../ansible_collections/libcare/livepatch and a git
# checkout, so the tracked (and new, not ignored) files are copied into
# build/sanity/ansible_collections/libcare/livepatch and committed there.
# Each sanity test runs in a virtualenv ansible-test makes and fills from PyPI; it
# bootstraps pip in it with a script it downloads from a host that is not reachable
# here. A stand-in (ensurepip, then pip from PyPI) is put in its cache, under a HOME of
# our own (.cache/ansible-test-home), so nothing outside the project is touched.
#
# Usage: tests/ansible/run-sanity.sh [ansible-test sanity options...]
# Exit status: non-zero when any sanity test fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$ROOT/.venv
TEST_HOME=$ROOT/.cache/ansible-test-home
COPY=$ROOT/build/sanity/ansible_collections/libcare/livepatch
# Sanity tests that need neither a container nor the network (pslint needs PowerShell).
TESTS=(action-plugin-docs ansible-doc changelog compile empty-init ignores import line-endings no-assert
       no-get-exception no-illegal-filenames no-smart-quotes pep8 pylint replace-urlopen
       runtime-metadata shebang shellcheck symlinks use-argspec-type-path use-compat-six
       validate-modules yamllint)
# Our paths (the engine under plugins/module_utils/ has its own checks: ruff, pytest).
TARGETS=(plugins/modules/ plugins/doc_fragments/ roles/ playbooks/ extensions/ tests/ansible/
         tests/unit/plugins/modules/ tests/integration/targets/ meta/ galaxy.yml)

log() { printf '[run-sanity] %s\n' "$*"; }

# ansible-test names the script after the pip version it wants
pip_version=$(sed -n "s/.*pip='\([0-9.]*\)'.*/\1/p" \
    "$("$VENV/bin/python" -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')/_internal/python_requirements.py" | head -1)
for version in ${pip_version:-24.2}; do
    script=$TEST_HOME/.ansible/test/cache/get_pip_${version//./_}.py
    [ -f "$script" ] && continue
    mkdir -p "$(dirname "$script")"
    cat >"$script" <<'PYEOF'
"""Stand-in for get-pip.py: pip from the interpreter's ensurepip, then the requested packages from PyPI."""
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"], stdout=subprocess.DEVNULL)
arguments = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet"] + arguments)
PYEOF
done

log "copying the collection to $COPY"
rm -rf "$ROOT/build/sanity"
mkdir -p "$COPY"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' path; do
    [ -e "$path" ] || [ -L "$path" ] || continue        # deleted in the work tree
    cp --parents -P -- "$path" "$COPY/"
done
(cd "$COPY" && git init -q . && git add -A && git -c user.email=sanity@localhost -c user.name=sanity commit -qm snapshot)

existing=()
for target in "${TARGETS[@]}"; do
    [ -e "$COPY/$target" ] && existing+=("$target")
done
tests=()
for test in "${TESTS[@]}"; do
    if [ "$test" = shellcheck ] && ! command -v shellcheck >/dev/null; then
        log "skipping shellcheck (not installed)"
        continue
    fi
    tests+=(--test "$test")
done

cd "$COPY"
log "ansible-test sanity: $(( ${#tests[@]} / 2 )) tests on: ${existing[*]}"
HOME=$TEST_HOME PATH=$VENV/bin:$PATH "$VENV/bin/ansible-test" sanity --local --python 3.11 --color no \
    "${tests[@]}" "$@" "${existing[@]}"
