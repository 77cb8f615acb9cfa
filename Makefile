# libcare.livepatch: `make setup` installs everything, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT := DEBIAN_FRONTEND=noninteractive apt-get -y -o DPkg::Lock::Timeout=600

.PHONY: setup setup-debian setup-python test lint unit integration bench demo clean

setup: setup-debian setup-python

setup-debian:
	$(APT) update
	$(APT) install --no-install-recommends $$(grep -v '^#' packaging-debian.txt)

setup-python:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt

test: lint unit integration

lint:
	$(VENV)/bin/ruff check .

unit:
	$(PY) -m pytest -q tests/unit

integration:
	$(PY) -m pytest -q tests/integration

clean:
	rm -rf build .pytest_cache tests/output
