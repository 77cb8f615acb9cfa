"""The layout check on real gcc/g++ 12 output (-g): a struct, union or class whose size,
member offsets or member types change between the original and the patched unit is
refused naming it; unchanged types, new types and types local to a function pass; units
without debug information cannot be compared (False)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from plugins.module_utils.careengine.errors import UnpatchableChange
from plugins.module_utils.careengine.patchbuild.layout_check import check_layouts, read_layouts

CXX_SOURCE = r"""
namespace geo {
struct Box { int w; int h; };
template <typename T> struct Pair { T first; T second; };
}
struct Shape { virtual ~Shape() {} int id; };
struct Square : Shape { int side; };
union Word { int number; char bytes[4]; };

int make_square(int side)	// constructs one: g++ describes a polymorphic class where its vtable is
{
	Square square;
	square.side = side;
	return square.side;
}

int area(geo::Box *box, geo::Pair<long> *pair, Square *square, Word *word)
{
	struct Local { int a; } local = {box->w};
	return local.a * box->h + (int)pair->second + square->side + square->id + word->number;
}
"""
C_SOURCE = r"""
struct tally { int rounds; long letters; };
typedef struct { short low; short high; } range;
int count(struct tally *tally, range *span) { return tally->rounds + (int)tally->letters + span->high; }
"""


def _asm(tmp_path: Path, name: str, source: str, *flags: str, suffix: str = "cc") -> str:
    compiler = "g++" if suffix == "cc" else "gcc"
    (tmp_path / f"{name}.{suffix}").write_text(source)
    subprocess.run([compiler, "-O2", *flags, "-S", "-o", str(tmp_path / f"{name}.s"),
                    str(tmp_path / f"{name}.{suffix}")], check=True)
    return str(tmp_path / f"{name}.s")


def test_layouts_are_read_by_qualified_name_with_bases_and_templates(tmp_path):
    asm = _asm(tmp_path, "unit", CXX_SOURCE, "-g")
    subprocess.run(["as", "--64", "-o", str(tmp_path / "unit.o"), asm], check=True)
    with open(tmp_path / "unit.o", "rb") as stream:
        layouts = read_layouts(stream)
    assert {"geo::Box", "geo::Pair<long int>", "Shape", "Square", "Word"} <= set(layouts)
    assert "Local" not in layouts and "area::Local" not in layouts          # local to a call
    (box,) = layouts["geo::Box"]
    assert (box.kind, box.size, [(m.name, m.offset, m.type_name) for m in box.members]) == \
        ("struct", 8, [("w", 0, "int"), ("h", 4, "int")])
    (square,) = layouts["Square"]
    assert square.members[0].name == "base Shape" and square.members[0].offset == 0


@pytest.mark.parametrize("old, new, message", [
    ("struct Box { int w; int h; };", "struct Box { int w; int h; int d; };",
     "the layout of struct geo::Box changed (size 8 -> 12; member `d` added at 8)"),
    ("struct Box { int w; int h; };", "struct Box { int h; int w; };",
     "the layout of struct geo::Box changed (member `h` moved 4 -> 0; member `w` moved 0 -> 4)"),
    ("T first; T second;", "T second; T first;",
     "the layout of struct geo::Pair<long int> changed (member `second` moved 8 -> 0; member `first` moved 0 -> 8)"),
    ("struct Square : Shape { int side; };", "struct Square : Shape { unsigned side; };",
     "the layout of struct Square changed (member `side` type int -> unsigned int)"),
    ("union Word { int number; char bytes[4]; };", "union Word { int number; char bytes[8]; };",
     "the layout of union Word changed (size 4 -> 8; member `bytes` type char[4] -> char[8])"),
    ("struct Local { int a; }", "struct Local { long a; int b; }", None),        # local to a call: fine
    ("return local.a *", "return 2 * local.a *", None),                              # code only
])
def test_changed_layouts_are_refused_by_name(tmp_path, old, new, message):
    assert old in CXX_SOURCE
    original = _asm(tmp_path, "original", CXX_SOURCE, "-g")
    patched = _asm(tmp_path, "patched", CXX_SOURCE.replace(old, new), "-g")
    if message is None:
        assert check_layouts(original, patched) is True
        return
    with pytest.raises(UnpatchableChange) as refused:
        check_layouts(original, patched)
    assert str(refused.value).startswith(message + ":"), str(refused.value)
    assert "objects that exist keep the old layout" in str(refused.value)


def test_c_structs_are_checked_too(tmp_path):
    original = _asm(tmp_path, "original", C_SOURCE, "-g", suffix="c")
    patched = _asm(tmp_path, "patched", C_SOURCE.replace("int rounds;", "int rounds; int misses;"), "-g",
                   suffix="c")
    with pytest.raises(UnpatchableChange, match=r"^the layout of struct tally changed \(member `misses` added at 4\)"):
        check_layouts(original, patched)


def test_a_c_struct_named_by_its_typedef_is_checked(tmp_path):
    original = _asm(tmp_path, "original", C_SOURCE, "-g", suffix="c")
    patched = _asm(tmp_path, "patched", C_SOURCE.replace("short high;", "int high;"), "-g", suffix="c")
    with pytest.raises(UnpatchableChange, match=r"^the layout of struct range changed \(size 4 -> 8; "
                                                r"member `high` moved 2 -> 4; member `high` type short int -> int\)"):
        check_layouts(original, patched)


def test_a_new_type_is_not_a_change(tmp_path):
    original = _asm(tmp_path, "original", C_SOURCE, "-g", suffix="c")
    added = C_SOURCE + "struct extra { char c; };\nint peek(struct extra *e) { return e->c; }\n"
    assert check_layouts(original, _asm(tmp_path, "patched", added, "-g", suffix="c")) is True


def test_units_without_debug_information_cannot_be_compared(tmp_path):
    original = _asm(tmp_path, "original", C_SOURCE, suffix="c")
    patched = _asm(tmp_path, "patched", C_SOURCE.replace("int rounds;", "int rounds; int misses;"), suffix="c")
    assert check_layouts(original, patched) is False
