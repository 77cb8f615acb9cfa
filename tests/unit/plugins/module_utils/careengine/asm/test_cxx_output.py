"""The asm diff on real g++ 12 output: exception tables refer to debug labels (.LFB,
.LCOLDB), so only real changes count as changes and the instrumented file assembles;
which C++ changes are accepted (calls, handlers and template instances in COMDAT groups:
yes; new data and changed vtables: refused by name). COMDAT groups of patch code:
test_comdat.py."""

from __future__ import annotations

import re
import subprocess

import pytest

from plugins.module_utils.careengine.asm import cxx, gensrc, parse
from plugins.module_utils.careengine.asm.cxx import demangle
from plugins.module_utils.careengine.errors import UnpatchableChange

SOURCE = r"""#include <cstdio>
#include <stdexcept>
#include <string>

struct Shape {
	virtual ~Shape() {}
	virtual int area() const = 0;
};
struct Square : Shape {
	int side;
	explicit Square(int s) : side(s) {}
	int area() const override;
};

__attribute__((noinline)) int Square::area() const { return side * side; }

template <typename T> __attribute__((noinline)) T scale(T x) { return x * 3; }

namespace geo {
__attribute__((noinline)) int check(int n)
{
	if (n < 0)
		throw std::runtime_error("negative");
	return n + 1;
}
}

static std::string label(int n)
{
	static const std::string prefix = "value ";
	return prefix + std::to_string(n);
}

int main()
{
	Square square(4);
	Shape *shape = &square;
	for (int i = 0; i < 3; i++) {
		try {
			std::printf("%s %d %d\n", label(geo::check(i - 1)).c_str(), shape->area(), scale(i));
		} catch (const std::exception &error) {
			std::printf("caught %s\n", error.what());
		}
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def original(tmp_path_factory, gxx) -> str:
    return gxx(tmp_path_factory.mktemp("gxx"), "original", SOURCE)


def test_moved_lines_change_nothing(original, tmp_path, gxx):
    moved = gxx(tmp_path, "moved", "// one more line\n" + SOURCE)
    result = gensrc.generate(original, moved)
    assert (result.changed_functions, result.new_functions, result.new_variables) == ((), (), ())


@pytest.mark.parametrize("old, new, changed", [
    ("return side * side;", "return side * side + 1;", ["Square::area() const"]),
    ("return x * 3;", "return x * 5;", ["int scale<int>(int)"]),
    ("return n + 1;", "return n + 2;", ["geo::check(int)"]),            # has a throw: exception tables
])
def test_real_changes_are_exactly_the_changed_functions(original, tmp_path, old, new, changed, gxx):
    patched = gxx(tmp_path, "patched", SOURCE.replace(old, new))
    result = gensrc.generate(original, patched)
    assert demangle(result.changed_functions) == changed
    (tmp_path / "instrumented.s").write_text(result.text)
    assembled = subprocess.run(["g++", "-c", "-o", str(tmp_path / "instrumented.o"), str(tmp_path / "instrumented.s")],
                               capture_output=True, text=True, check=False)
    assert assembled.returncode == 0, assembled.stderr[:2000]     # the copy's exception table labels exist


@pytest.mark.parametrize("old, new, refusal", [
    ("return side * side;", "return side * side + 1;", None),                       # a leaf: accepted
    ("return x * 3;", "return x * 5;", None),              # a template instance (COMDAT): patched once
    ("return n + 1;", "return n + 2;", None),        # throws: its unwind records and exception table go along
    ('std::printf("caught %s\\n"', 'std::printf("CAUGHT %s\\n"', None),          # main's handler changes
    ("return side * side;", "static int calls; return side * side + calls++;", None),     # a local static
    ("return side * side;", "static const std::string unit = \"u\"; return side * side + (int)unit.size();",
     "Square::area() const::unit has a destructor registered at exit"),
])
def test_what_cxx_changes_are_accepted(original, tmp_path, old, new, refusal, gxx):
    assert old in SOURCE
    patched_text = gxx(tmp_path, "patched", SOURCE.replace(old, new))
    result = gensrc.generate(original, patched_text)
    check = lambda: cxx.check_change(parse.parse(patched_text), result.changed_functions,  # noqa: E731
                                     result.new_functions, result.new_variables, source="shapes.cc")
    if refusal is None:
        check()
        return
    with pytest.raises(UnpatchableChange, match=re.escape(refusal)):
        check()


def test_a_function_that_calls_another_is_accepted(tmp_path, gxx):
    caller = "int twice(int);\n__attribute__((noinline)) int twice(int x) { return x * 2; }\n" \
             "int caller(int x) { return twice(x) + %d; }\n"
    before = gxx(tmp_path, "before", caller % 1)
    after = gxx(tmp_path, "after", caller % 2)
    result = gensrc.generate(before, after)
    assert demangle(result.changed_functions) == ["caller(int)"]
    cxx.check_change(parse.parse(after), result.changed_functions, result.new_functions, result.new_variables)


def test_a_changed_virtual_interface_is_refused_naming_the_class(original, tmp_path, gxx):
    patched = gxx(tmp_path, "patched", SOURCE.replace("virtual int area() const = 0;",
                                                        "virtual int area() const = 0;\n\tvirtual int sides() const;"))
    with pytest.raises(UnpatchableChange, match=r"the (vtable|typeinfo|typeinfo name) of class (Shape|Square) changed"):
        gensrc.generate(original, patched)
