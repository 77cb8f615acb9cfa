"""The unwind records of patch code (.kpatch.eh_frame) on real g++ 12 output: binutils'
own decoder reads them, every hot and cold part of a patched function has one FDE with
the personality and LSDA gcc chose, and the unwind rows equal those gas makes for the
original function (same code layout)."""

from __future__ import annotations

import re
import subprocess

import pytest

from plugins.module_utils.careengine.asm import eh_frame, gensrc
from plugins.module_utils.careengine.errors import UnpatchableChange

SOURCE = r"""#include <cstdio>
#include <stdexcept>
__attribute__((noinline)) int thrower(int x) { if (x > 5) throw std::runtime_error("big"); return x * 2; }
__attribute__((noinline)) int caller(int x) { return thrower(x) + 1; }
__attribute__((noinline)) int handler(int x)
{
	try {
		return thrower(x);
	} catch (const std::runtime_error &error) {
		std::puts(error.what());
		return -1;
	}
}
int main(int argc, char **) { return handler(argc) + caller(argc); }
"""
CHANGES = (("return thrower(x) + 1;", "return thrower(x) + 7;"), ("return -1;", "return -7;"))


def _gxx_s(tmp_path, name: str, source: str) -> str:
    (tmp_path / f"{name}.cc").write_text(source)
    subprocess.run(["g++", "-O2", "-g", "-fPIE", "-S", "-o", str(tmp_path / f"{name}.s"),
                    str(tmp_path / f"{name}.cc")], check=True)
    return (tmp_path / f"{name}.s").read_text()


def _frames(binary) -> dict[int, tuple[str, list[str]]]:
    """FDE start -> (augmentation of its CIE, unwind rows relative to the start), by readelf."""
    text = subprocess.run(["readelf", "--debug-dump=frames-interp", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    augmentation: dict[str, str] = {}
    frames: dict[int, tuple[str, list[str]]] = {}
    for record in text.split("\n\n"):
        cie = re.match(r"\s*([0-9a-f]+) \S+ \S+ CIE \"(\w*)\"", record)
        if cie:
            augmentation[cie.group(1)] = cie.group(2)
            continue
        fde = re.match(r"\s*[0-9a-f]+ \S+ \S+ FDE cie=([0-9a-f]+) pc=([0-9a-f]+)\.\.", record)
        if not fde:
            continue
        start = int(fde.group(2), 16)
        rows: dict[int, str] = {}       # several rows at one location: the last one holds there
        for line in record.splitlines()[2:]:
            if re.match(r"^[0-9a-f]{8,}", line):
                location, rest = line.split(None, 1)
                rows[int(location, 16) - start] = " ".join(rest.split())
        frames[start] = (augmentation.get(fde.group(1), ""), [f"{offset} {row}" for offset, row in rows.items()])
    return frames


def _symbols(binary) -> dict[str, int]:
    text = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    return {fields[2]: int(fields[0], 16) for fields in map(str.split, text.splitlines()) if len(fields) == 3}


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ehframe")
    original = _gxx_s(tmp_path, "original", SOURCE)
    changed = SOURCE
    for old, new in CHANGES:
        changed = changed.replace(old, new)
    result = gensrc.generate(original, _gxx_s(tmp_path, "patched", changed))
    (tmp_path / "instrumented.s").write_text(result.text)
    binary = tmp_path / "instrumented"
    subprocess.run(["g++", "-pie", "-o", str(binary), str(tmp_path / "instrumented.s")], check=True,
                   capture_output=True)
    # binutils decodes only a section named .eh_frame: give it ours in a copy.
    only_patch = tmp_path / "only_patch"
    subprocess.run(["objcopy", "-R", ".eh_frame", "-R", ".eh_frame_hdr", "--rename-section",
                    f"{eh_frame.KPATCH_EH_FRAME}=.eh_frame", str(binary), str(only_patch)], check=True)
    return result, _symbols(binary), _frames(binary), _frames(only_patch)


def test_every_part_of_each_patched_function_has_an_fde_with_personality_and_lsda(linked):
    result, symbols, original_frames, patch_frames = linked
    assert set(result.changed_functions) >= {"_Z6calleri", "_Z7handleri"}
    for name in ("_Z6calleri", "_Z7handleri"):
        parts = [name] + ([f"{name}.cold"] if f"{name}.cold" in symbols else [])
        for part in parts:
            assert symbols[part + ".kpatch"] in patch_frames, part
            # the same augmentation as gas wrote for the original (zPLR: personality and LSDA)
            assert patch_frames[symbols[part + ".kpatch"]][0] == original_frames[symbols[part]][0]
    assert patch_frames[symbols["_Z7handleri.kpatch"]][0] == "zPLR"
    assert all(start in symbols.values() for start in patch_frames)


@pytest.mark.parametrize("name", ["_Z6calleri", "_Z7handleri", "_Z7handleri.cold"])
def test_unwind_rows_of_the_copy_equal_the_original_ones(linked, name):
    _, symbols, original_frames, patch_frames = linked
    if name not in symbols:
        pytest.skip(f"g++ made no {name} here")
    copy = name + ".kpatch"
    assert patch_frames[symbols[copy]][1] == original_frames[symbols[name]][1]


def test_the_exception_table_moves_to_its_own_section(linked):
    result, _, _, _ = linked
    assert f".section\t{eh_frame.SECTION_SPECS[eh_frame.KPATCH_EXCEPT_TABLE]}" in result.text
    assert ".cfi_lsda" not in result.text.split(".kpatch.text", 1)[1].split(".popsection", 1)[0]


@pytest.mark.parametrize("value, uleb, sleb", [(0, [0], [0]), (127, [0x7F], [0xFF, 0]), (128, [0x80, 1], [0x80, 1]),
                                               (-8, None, [0x78])])
def test_leb128(value, uleb, sleb):
    if uleb is not None:
        assert eh_frame._uleb(value) == uleb
    assert eh_frame._sleb(value) == sleb


def test_state_directives_and_offsets_are_encoded():
    collector = eh_frame.UnwindCollector(".Lt")
    collector.directive(".cfi_startproc", "", "f")
    collector.directive(".cfi_def_cfa_offset", "16", "f")
    collector.directive(".cfi_remember_state", "", "f")
    collector.directive(".cfi_adjust_cfa_offset", "8", "f")
    collector.directive(".cfi_restore_state", "", "f")
    collector.directive(".cfi_offset", "17, -24", "f")
    collector.directive(".cfi_endproc", "", "f")
    program = [line for line in collector.records() if line.startswith("\t.byte\t") and "0x4" != line.split()[-1]]
    assert "\t.byte\t0xe, 0x10" in program            # def_cfa_offset 16
    assert "\t.byte\t0xe, 0x18" in program            # adjusted by 8 -> 24
    assert "\t.byte\t0xa" in program and "\t.byte\t0xb" in program
    assert "\t.byte\t0x91, 0x3" in program            # r17 at cfa-24


@pytest.mark.parametrize("head, args", [(".cfi_rel_offset", "6, 0"), (".cfi_def_cfa_offset", "%rsp"),
                                        (".cfi_signal_frame", "")])
def test_unsupported_directives_are_refused(head, args):
    collector = eh_frame.UnwindCollector()
    collector.directive(".cfi_startproc", "", "f")
    with pytest.raises(UnpatchableChange, match="f: "):
        collector.directive(head, args, "f")


def test_personality_and_typeinfo_pointers_survive_a_link_that_discards_this_units_comdat_copies(linked, tmp_path):
    """g++ reaches them through DW.ref.X in COMDAT groups; linked after another unit that
    has them, this unit's copies are discarded, and a reference from .kpatch.* would fail
    the link. The patch uses pointer slots of its own."""
    result = linked[0]
    in_patch, patch_lines = False, []
    for line in result.text.splitlines():
        if line.startswith("\t.pushsection\t.kpatch."):
            in_patch = True
        elif line.startswith("\t.popsection"):
            in_patch = False
        elif in_patch:
            patch_lines.append(line)
    assert any(".Lkpref" in line for line in patch_lines)
    assert not any("DW.ref." in line for line in patch_lines)
    (tmp_path / "other.cc").write_text('#include <stdexcept>\nint other(int x) { try { if (x) throw 1; } '
                                       'catch (const std::runtime_error &) { return 2; } catch (int) { return 3; } '
                                       'return 0; }\n')
    subprocess.run(["g++", "-O2", "-fPIE", "-c", "-o", str(tmp_path / "other.o"), str(tmp_path / "other.cc")],
                   check=True)
    (tmp_path / "instrumented.s").write_text(result.text)
    linking = subprocess.run(["g++", "-pie", "-o", str(tmp_path / "both"), str(tmp_path / "other.o"),
                              str(tmp_path / "instrumented.s")], capture_output=True, text=True, check=False)
    assert linking.returncode == 0, linking.stderr[-2000:]
