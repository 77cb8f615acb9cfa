"""Which new data of a C++ unit a patch carries, on real g++ 12 output: function-local
statics (with or without a dynamic initialiser), their guards and literals are carried;
data that needs start-up code, an exit-time destructor or a COMDAT group's one copy is
refused naming the object demangled."""

from __future__ import annotations

import re

import pytest

from plugins.module_utils.careengine.asm import cxx, cxx_data, gensrc, parse
from plugins.module_utils.careengine.errors import UnpatchableChange

SOURCE = r"""#include <cstdio>
#include <string>

std::string banner = "hello";
int total;

__attribute__((noinline)) void label(int n)
{
	std::printf("%s %d\n", banner.c_str(), n);
}
"""
PRINT = 'std::printf("%s %d\\n", banner.c_str(), n);'


@pytest.fixture(scope="module")
def original(tmp_path_factory, gxx) -> str:
    return gxx(tmp_path_factory.mktemp("gxx"), "original", SOURCE)


def _check(original: str, patched: str) -> gensrc.GensrcResult:
    """The wrapper's C++ steps, in its order: start-up objects, the diff, the C++ rules."""
    cxx_data.check_static_init(parse.parse(original), parse.parse(patched), source="label.cc")
    result = gensrc.generate(original, patched)
    cxx.check_change(parse.parse(patched), result.changed_functions, result.new_functions, result.new_variables,
                     source="label.cc")
    return result


@pytest.mark.parametrize("new, carried", [
    # zero-initialised, no code needed
    ("static int calls; std::printf(\"%d %d\\n\", n, ++calls);", ["_ZZ5labeliE5calls"]),
    # a dynamic initialiser run by the first call of the new code (guarded), no destructor
    ("static const int first = std::printf(\"first\\n\"); std::printf(\"%d %d\\n\", n, first);",
     ["_ZGVZ5labeliE5first", "_ZZ5labeliE5first"]),
    # a std::string built from a new literal: the literal is .rodata, nothing to report
    ("std::string text = \"fixed \" + banner; std::printf(\"%s %d\\n\", text.c_str(), n);", []),
    # constant tables need no code
    ("static constexpr int squares[] = {0, 1, 4, 9, 16}; std::printf(\"%d\\n\", squares[n % 5]);",
     ["_ZZ5labeliE7squares"]),
])
def test_new_data_the_new_code_initialises_is_carried(original, tmp_path, new, carried, gxx):
    patched = gxx(tmp_path, "patched", SOURCE.replace(PRINT, new))
    result = _check(original, patched)
    assert result.changed_functions == ("_Z5labeli",)
    assert [name for name in result.new_variables if not name.startswith("DW.ref.")] == carried
    for name in carried:      # placed in the patch's own data
        assert re.search(rf"\.pushsection\t\.kpatch\.data[^\n]*\n(?:[^\n]*\n){{0,6}}{name}:", result.text), name


@pytest.mark.parametrize("old, new, refusal", [
    (PRINT, "static const std::string prefix = \"p \"; std::printf(\"%s%d\\n\", prefix.c_str(), n);",
     r"^label\.cc: label\(int\)::prefix has a destructor registered at exit \(__cxa_atexit\)"),
    ("int total;", "int total;\nstd::string extra = \"x\";",
     r"^label\.cc: extra\[abi:cxx11\] has a dynamic initialiser: it would run in the unit's start-up code "
     r"\(_GLOBAL__sub_I_\w+\)"),
    ('std::string banner = "hello";', 'std::string banner = "hullo";',
     r"^label\.cc: the start-up code of the unit \(_GLOBAL__sub_I_\w+\) changed, initialising "
     r"banner\[abi:cxx11\]"),
    ("int total;", "int total;\ninline int shared = 3;\nint bump() { return ++shared; }",
     r"^label\.cc: shared is writable data or a guard of an inline function, inline variable or template "
     r"\(COMDAT"),
])
def test_data_a_patch_cannot_carry_is_refused_by_name(original, tmp_path, old, new, refusal, gxx):
    assert old in SOURCE
    patched = gxx(tmp_path, "patched", SOURCE.replace(old, new))
    with pytest.raises(UnpatchableChange, match=refusal):
        _check(original, patched)


def test_a_new_global_in_a_unit_without_start_up_code_is_named_not_its_init_array_entry(tmp_path, gxx):
    plain = "int total;\nint read_total() { return total; }\n"
    before = gxx(tmp_path, "before", "#include <string>\n" + plain)
    after = gxx(tmp_path, "after", "#include <string>\nstd::string title = \"t\";\n" + plain)
    with pytest.raises(UnpatchableChange, match=r"^title\[abi:cxx11\] has a dynamic initialiser"):
        cxx_data.check_static_init(parse.parse(before), parse.parse(after))
    with pytest.raises(UnpatchableChange, match=r"init_array|statements outside functions"):
        gensrc.generate(before, after)     # what the diff alone would say


def test_only_the_static_with_a_destructor_is_named_once(original, tmp_path, gxx):
    """Its guard is named through it; std::to_string's digit table (read-only, COMDAT,
    new to the unit and used by the same function) is not destroyed at exit."""
    patched = gxx(tmp_path, "patched", SOURCE.replace(
        PRINT, "static const std::string prefix = \"p \"; "
               "std::printf(\"%s%s\\n\", prefix.c_str(), std::to_string(n).c_str());"))
    assert "__digits" in patched and "__digits" not in original
    with pytest.raises(UnpatchableChange) as refused:
        _check(original, patched)
    assert "guard variable" not in str(refused.value) and "__digits" not in str(refused.value)
    assert str(refused.value).count("label(int)::prefix") == 1
