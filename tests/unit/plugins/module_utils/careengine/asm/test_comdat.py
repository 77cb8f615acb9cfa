"""COMDAT groups of patch code on real g++ 12 output: a changed inline function or template
instance goes, with its .kpatch records, in a group of its own keyed <symbol>.kpatch (so a
link of several units keeps one), its new symbol weak and hidden; its digest is the same
in units that number labels and literals differently and differs between -O0 and -O2, or
when only a literal it uses differs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine.asm import comdat, gensrc

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

HEADER = r"""
inline __attribute__((noinline)) const char *verdict(int n)
{
	return n > 2 ? "big" : "small";
}
template <typename T> __attribute__((noinline)) T twice(T value)
{
	return value * 2;
}
"""
UNIT = HEADER + "int use(int n) { return verdict(n)[0] + twice(n); }\n"
# Literals and labels before the shared code: gcc numbers this unit's .LC and .L labels differently.
OTHER_UNIT = ('const char *other(int n) { return n ? "one" : n > 5 ? "two" : "three"; }\n' + HEADER
              + "int more(int n) { return verdict(n + 1)[1] + twice(n + 1); }\n")
CHANGE = ('"big" : "small"', '"BIG" : "small"'), ("value * 2", "value * 3")
SYMBOLS = ("_Z7verdicti", "_Z5twiceIiET_S0_")


def _asm(tmp_path: Path, name: str, source: str, *flags: str) -> str:
    path = tmp_path / f"{name}.cc"
    path.write_text(source)
    subprocess.run(["g++", "-O2", "-g", *flags, "-S", "-o", str(tmp_path / f"{name}.s"), str(path)], check=True)
    return (tmp_path / f"{name}.s").read_text()


def _patched(source: str) -> str:
    for old, new in CHANGE:
        source = source.replace(old, new)
    return source


def _instrumented(tmp_path: Path, name: str, source: str, *flags: str) -> gensrc.GensrcResult:
    return gensrc.generate(_asm(tmp_path, name + "_old", source, *flags),
                           _asm(tmp_path, name + "_new", _patched(source), *flags))


def _digests(text: str) -> dict[str, str]:
    return dict(re.findall(r'^\t\.string\t"(\S+) ([0-9a-f]{64})"$', text, re.MULTILINE))


def test_comdat_group_reads_gxx_section_specs():
    specs = {".text._Z5twiceIiET_S0_": '.text._Z5twiceIiET_S0_,"axG",@progbits,_Z5twiceIiET_S0_,comdat',
             ".text": ".text"}
    assert comdat.comdat_group(".text._Z5twiceIiET_S0_", specs) == "_Z5twiceIiET_S0_"
    assert comdat.comdat_group(".text", specs) is None
    assert comdat.comdat_group(".text.unknown", specs) is None


def test_grouped_moves_only_the_patch_sections_into_the_group():
    lines = ['\t.pushsection\t.kpatch.text,"ax",@progbits', "\tret", '\t.section\t.kpatch.data,"aw",@progbits',
             "\t.popsection", '\t.pushsection\t.rodata,"a",@progbits']
    specs = ['.kpatch.text,"ax",@progbits', '.kpatch.data,"aw",@progbits']
    assert comdat.grouped(lines, "f.kpatch", specs) == [
        '\t.pushsection\t.kpatch.text,"axG",@progbits,f.kpatch,comdat', "\tret",
        '\t.section\t.kpatch.data,"awG",@progbits,f.kpatch,comdat', "\t.popsection",
        '\t.pushsection\t.rodata,"a",@progbits']


def test_changed_instances_and_their_records_are_in_a_group_of_their_own(tmp_path):
    result = _instrumented(tmp_path, "unit", UNIT)
    assert set(SYMBOLS) <= set(result.changed_functions)
    (tmp_path / "unit.kp.s").write_text(result.text)
    subprocess.run(["g++", "-c", "-o", str(tmp_path / "unit.o"), str(tmp_path / "unit.kp.s")], check=True)
    groups = subprocess.run(["readelf", "-gW", str(tmp_path / "unit.o")], capture_output=True, text=True,
                            check=True).stdout
    for symbol in SYMBOLS:
        members = re.search(rf"\[{re.escape(symbol)}\.kpatch\] contains \d+ sections:\n(.*?)(?:\n\n|\Z)",
                            groups, re.DOTALL)
        assert members, groups
        for section in (".kpatch.text", ".kpatch.info", ".kpatch.strtab", ".kpatch.eh_frame"):
            assert section in members.group(1), (symbol, members.group(1))
    symbols = subprocess.run(["readelf", "-sW", str(tmp_path / "unit.o")], capture_output=True, text=True,
                             check=True).stdout
    for symbol in SYMBOLS:
        assert re.search(rf"FUNC\s+WEAK\s+HIDDEN\s+\d+ {re.escape(symbol)}\.kpatch$", symbols, re.MULTILINE), symbols
    # a function outside any group (use) keeps its records outside
    assert "[_Z3usei.kpatch]" not in groups


def test_a_two_unit_link_keeps_one_copy_and_records_both_digests(tmp_path):
    objects = []
    for name, source in (("one", UNIT), ("two", OTHER_UNIT)):
        (tmp_path / f"{name}.kp.s").write_text(_instrumented(tmp_path, name, source).text)
        subprocess.run(["g++", "-c", "-o", str(tmp_path / f"{name}.o"), str(tmp_path / f"{name}.kp.s")], check=True)
        objects.append(str(tmp_path / f"{name}.o"))
    linked = tmp_path / "linked.o"
    subprocess.run(["ld", "-r", "-o", str(linked), *objects], check=True)
    symbols = subprocess.run(["readelf", "-sW", str(linked)], capture_output=True, text=True, check=True).stdout
    for symbol in SYMBOLS:
        assert len(re.findall(rf" {re.escape(symbol)}\.kpatch$", symbols, re.MULTILINE)) == 1, symbols
    with linked.open("rb") as stream:
        records = ELFFile(stream).get_section_by_name(comdat.DIGEST_SECTION).data()
    assert all(records.count(f"{symbol} ".encode()) == 2 for symbol in SYMBOLS)     # each unit's record
    digests = comdat.read_digests(records)
    assert {symbol: len(found) for symbol, found in digests.items()} == dict.fromkeys(SYMBOLS, 1)
    assert comdat.differing_copies(records) == []


def test_digests_ignore_numbering_and_see_other_flags(tmp_path):
    one = _digests(_instrumented(tmp_path, "one", UNIT).text)
    two = _digests(_instrumented(tmp_path, "two", OTHER_UNIT).text)
    unoptimised = _digests(_instrumented(tmp_path, "slow", UNIT, "-O0").text)
    assert set(one) == set(SYMBOLS)
    assert one == two                                   # same code, other .LC/.L numbers
    assert all(unoptimised[symbol] != one[symbol] for symbol in SYMBOLS)
    records = b"".join(f"{symbol} {digest}\0".encode() for found in (one, unoptimised)
                       for symbol, digest in found.items())
    assert comdat.differing_copies(records) == sorted(SYMBOLS)


def test_digests_see_a_literal_that_differs_where_the_code_does_not(tmp_path):
    """A macro may change a string between units and leave the code as it is."""
    one = _digests(_instrumented(tmp_path, "one", UNIT).text)
    other_word = _patched(UNIT).replace('"BIG"', '"HUG"')
    other = _digests(gensrc.generate(_asm(tmp_path, "word_old", UNIT), _asm(tmp_path, "word_new", other_word)).text)
    assert other["_Z5twiceIiET_S0_"] == one["_Z5twiceIiET_S0_"]
    assert other["_Z7verdicti"] != one["_Z7verdicti"]
