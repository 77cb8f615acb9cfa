# libcare.livepatch: `make setup` installs everything, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT := DEBIAN_FRONTEND=noninteractive apt-get -y -o DPkg::Lock::Timeout=600

.PHONY: setup setup-debian setup-python setup-containers test lint unit integration \
        ansible-sanity ansible-lint molecule bench demo clean

## setup: Debian packages, .venv/ with pinned packages, container image for molecule
setup: setup-debian setup-python setup-containers

setup-debian:
	$(APT) update
	$(APT) install --no-install-recommends $$(grep -v '^#' packaging-debian.txt)

setup-python:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt

setup-containers:
	tests/ansible/setup-containers.sh

## test: everything; any failure fails the run
test: lint unit integration ansible-sanity ansible-lint molecule

lint:
	$(VENV)/bin/ruff check .

unit:
	$(PY) -m pytest -q tests/unit

integration:
	$(PY) -m pytest -q tests/integration

ansible-sanity:
	tests/ansible/run-sanity.sh

ansible-lint:
	tests/ansible/run-lint.sh

molecule:
	tests/ansible/run-molecule.sh default

## bench: performance figures, one JSON object per line (see bench/README.md)
bench:
	bench/run_all.sh

clean:
	rm -rf build .pytest_cache tests/output
