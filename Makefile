# libcare.livepatch: `make setup` installs everything, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT := DEBIAN_FRONTEND=noninteractive apt-get -y -o DPkg::Lock::Timeout=600

.PHONY: setup setup-debian setup-python setup-ansible setup-realproject test lint collected unit integration \
        ansible-test ansible-sanity ansible-lint ansible-integration molecule molecule-watch clean-install collection changelog \
        bench demo clean bytecode

## setup: Debian packages, .venv/ with pinned packages, molecule image and wheels, real-project sources
setup: setup-debian setup-python setup-ansible setup-realproject

setup-debian:
	$(APT) update
	$(APT) install --no-install-recommends $$(grep -v '^#' packaging-debian.txt)

setup-python:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(MAKE) --no-print-directory bytecode

# The engine's bytecode, written once: each libcare-ctl run then skips compiling it (~15 ms),
# also where PYTHONDONTWRITEBYTECODE is set. Stale files are simply ignored by Python.
bytecode:
	$(PY) -m compileall -q plugins/module_utils >/dev/null

# podman, runc, catatonit, debootstrap; molecule and containers.podman into .venv; target wheels
# into .cache/wheels; image localhost/libcare-debian:12 (built once, ~3.5 min from scratch)
setup-ansible:
	tests/ansible/setup-containers.sh

setup-realproject:
	tests/realproject/prepare.sh
	tests/realproject/nginx/prepare.sh
	tests/realproject/cjson/prepare.sh
	tests/realproject/tinyxml/prepare.sh

## test: everything; any failure fails the run
test: lint collected unit integration ansible-test

lint:
	$(VENV)/bin/ruff check .

# every test file on disk is collected by pytest (a folder pytest skips fails the suite)
collected:
	$(PY) tests/check_collected.py

unit:
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

integration:
	$(PY) -m pytest -q -p no:cacheprovider tests/integration

ansible-test: ansible-sanity ansible-lint ansible-integration molecule molecule-watch clean-install

ansible-sanity:
	tests/ansible/run-sanity.sh

ansible-lint:
	tests/ansible/run-lint.sh

ansible-integration:
	tests/ansible/run-integration.sh

molecule:
	tests/ansible/run-molecule.sh

# libcare-livepatch.service under a real systemd (PID 1 in the container): restarts of the
# patched program print the fixed line first; systemd-analyze security scores the unit
molecule-watch:
	tests/ansible/run-molecule.sh watch

# the built tarball installed into an empty collections path runs the rollout on a container
clean-install:
	tests/ansible/run-clean-install.sh

collection:
	$(VENV)/bin/ansible-galaxy collection build --force --output-path dist/

# changelogs/fragments/*.yml -> changelogs/changelog.yaml and CHANGELOG.rst for galaxy.yml's version
# (run again to add fragments written since; ansible-doc must parse every module)
changelog:
	$(VENV)/bin/antsibull-changelog lint
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/antsibull-changelog release

## demo: start the buggy sample program, build its fix, patch it live, show the change, clean up
# The playbook's output (skipped tasks left out) is kept in .cache/demo.log; the run ends with
# the three lines that matter: what the program printed before, while patched, once unpatched.
demo:
	@mkdir -p .cache
	@. tests/ansible/collection-env.sh && ANSIBLE_DISPLAY_SKIPPED_HOSTS=false \
	    $(VENV)/bin/ansible-playbook -i playbooks/inventory/demo.ini playbooks/demo.yml | tee .cache/demo.log; \
	status=$${PIPESTATUS[0]}; \
	echo; echo "== libcare.livepatch demo (the same process throughout; full output in .cache/demo.log)"; \
	sed -n 's/^ *"msg": "pid \([0-9]*\) \(before\|patched\|unpatched\): *\(.*\)"$$/\2 \1 \3/p' .cache/demo.log \
	    | while read -r when pid line; do printf '  %-10s pid %s: %s\n' "$$when" "$$pid" "$$line"; done; \
	[ $$status -eq 0 ] && echo "== OK: fixed live, then restored, without a restart" || echo "== FAILED (exit $$status)"; \
	exit $$status

## bench: performance figures, one JSON object per line (see bench/README.md)
bench: bytecode
	bench/run_all.sh

clean:
	rm -rf dist .pytest_cache tests/output
