"""Shared by the C++ assembler tests: real g++ output."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


def compile_cxx(directory: Path, name: str, source: str) -> str:
    """``g++ -O2 -g -S`` of ``source`` (written as ``directory/name.cc``); the assembler text."""
    (directory / f"{name}.cc").write_text(source)
    subprocess.run(["g++", "-O2", "-g", "-S", "-o", str(directory / f"{name}.s"), str(directory / f"{name}.cc")],
                   check=True)
    return (directory / f"{name}.s").read_text()


@pytest.fixture(scope="session")
def gxx() -> Callable[[Path, str, str], str]:
    return compile_cxx
