"""Fixtures of the watch tests: the greeter project, a store, a running service."""

from __future__ import annotations

import os

import pytest
from watch_helpers import Program, Service, build_project, make_store


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the service needs root (fanotify permission events, ptrace)")
    return build_project(tmp_path_factory.mktemp("watch"))


@pytest.fixture
def store(project, tmp_path):
    return make_store(project, tmp_path / "store")


@pytest.fixture
def service(store, tmp_path, project):
    started = Service(store, tmp_path, project)
    yield started
    started.stop()


@pytest.fixture
def programs():
    started: list[Program] = []

    def start(*argv: str, stdin: bool = False, user: str | None = None) -> Program:
        program = Program(list(argv), stdin=stdin, user=user)
        started.append(program)
        return program

    yield start
    for program in started:
        program.stop()
