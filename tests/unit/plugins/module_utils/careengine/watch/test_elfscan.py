"""ELF facts from the first page, on real gcc output."""

from __future__ import annotations

import re
import subprocess

import pytest

from plugins.module_utils.careengine.watch.elfscan import elf_facts


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    where = tmp_path_factory.mktemp("elfscan")
    (where / "main.c").write_text("int main(void) { return 0; }\n")
    built = {}
    for name, flags in {"pie": ["-pie", "-fPIE"], "static": ["-static"], "norelro": ["-Wl,-z,norelro"],
                        "lib.so": ["-shared", "-fPIC"]}.items():
        subprocess.run(["gcc", *flags, "-Wl,--build-id", "-o", str(where / name), str(where / "main.c")],
                       check=True)
        built[name] = where / name
    return built


def _readelf_build_id(path) -> str:
    notes = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", notes).group(1)


@pytest.mark.parametrize("name, interp, relro", [("pie", True, True), ("static", False, True),
                                                 ("norelro", True, False), ("lib.so", False, True)])
def test_facts_match_readelf(programs, name, interp, relro):
    facts = elf_facts(str(programs[name]))
    assert facts.build_id == _readelf_build_id(programs[name])
    assert facts.has_interp is interp
    assert (facts.relro_offset is not None) is relro


def test_not_elf_is_none(tmp_path):
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert elf_facts(str(tmp_path / "script")) is None
    assert elf_facts(str(tmp_path / "missing")) is None
