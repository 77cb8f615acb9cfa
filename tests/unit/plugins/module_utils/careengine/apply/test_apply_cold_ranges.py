"""``ObjectFile.cold_parts``: the ``foo.cold`` / ``foo.cold.N`` parts gcc splits off ``foo``."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from plugins.module_utils.careengine.apply.object_files import ObjectFile

# Functions and look-alikes: only foo.cold and foo.cold.2 are parts of foo.
ASSEMBLER = """
	.text
	.globl foo
	.type foo, @function
foo:	ret
	.size foo, .-foo
	.type foobar.cold, @function
foobar.cold:	ret
	.size foobar.cold, .-foobar.cold
	.section .text.unlikely,"ax",@progbits
	.type foo.cold, @function
foo.cold:	nop
	ret
	.size foo.cold, .-foo.cold
	.type foo.cold.2, @function
foo.cold.2:	ret
	.size foo.cold.2, .-foo.cold.2
	.type foo.coldish, @function
foo.coldish:	ret
	.size foo.coldish, .-foo.coldish
	.type foo.cold.x, @function
foo.cold.x:	ret
	.size foo.cold.x, .-foo.cold.x
	.data
	.type bar.cold, @object
bar.cold:	.quad 0
	.size bar.cold, 8
"""


@pytest.fixture
def assembled(tmp_path):
    if shutil.which("as") is None:
        pytest.skip("no assembler here")
    source = tmp_path / "cold.s"
    source.write_text(ASSEMBLER)
    subprocess.run(["as", "-o", str(tmp_path / "cold.o"), str(source)], check=True)
    return tmp_path / "cold.o"


def _cold_parts(path, name):
    with open(path, "rb") as stream:
        return sorted((part.name, part.size) for part in ObjectFile(str(path), stream).cold_parts(name))


def test_cold_parts_by_name(assembled):
    assert _cold_parts(assembled, "foo") == [("foo.cold", 2), ("foo.cold.2", 1)]
    assert _cold_parts(assembled, "foobar") == [("foobar.cold", 1)]
    assert _cold_parts(assembled, "bar") == []             # data, not code
    assert _cold_parts(assembled, "baz") == []


def test_stripped_object_has_no_cold_parts(assembled, tmp_path):
    stripped = tmp_path / "stripped.o"
    subprocess.run(["strip", "-o", str(stripped), str(assembled)], check=True)
    assert _cold_parts(stripped, "foo") == []
