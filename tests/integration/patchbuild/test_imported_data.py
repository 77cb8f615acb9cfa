"""A fix that reaches imported data the original never used: stderr and a library's variable.

gcc's -fPIE / -fno-pie code reads such data directly, which would make the patched link
copy-relocate it into the executable's .bss and shift the original layout. The asm
diff sends these accesses through the GOT instead; the patch builds, adds no copy
relocation, and works on the running program.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine import patchfile

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests" / "fixtures" / "projects" / "imported"
PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")
CTL = str(ROOT / "bin" / "libcare-ctl")
CC_ARG = f"CC={ROOT / 'bin' / 'libcare-cc'}"
PROGRAMS = ("imported", "imported-nopie")
GOT_TYPES = {"R_X86_64_GOTPCREL": 9, "R_X86_64_GOTPCRELX": 41, "R_X86_64_REX_GOTPCRELX": 42}
LEA_OPCODE = 0x8D


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    project = Path(shutil.copytree(FIXTURE, tmp_path_factory.mktemp("imported") / "imported"))
    result = subprocess.run([PATCH_MAKE, "-m", CC_ARG, "fix.patch"], cwd=project, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return project


def _original(project: Path, program: str) -> Path:
    return project / "lpmake" / "usr" / "local" / "bin" / program


def _patched(project: Path, program: str) -> Path:
    return project / ".lpmaketmp" / "patched" / "usr" / "local" / "bin" / program


def _build_id(path: Path) -> str:
    notes = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", notes).group(1)


def _patch_path(project: Path, program: str) -> Path:
    return project / "patchroot" / f"{_build_id(_original(project, program))}.kpatch"


def _copy_relocated(path: Path) -> set[str]:
    """Names of the symbols an executable copy-relocates."""
    with open(path, "rb") as stream:
        elf = ELFFile(stream)
        names = set()
        for section in elf.iter_sections():
            if section["sh_type"] != "SHT_RELA" or not section["sh_link"]:
                continue
            dynsym = elf.get_section(section["sh_link"])
            for reloc in section.iter_relocations():
                if reloc["r_info_type"] == 5:      # R_X86_64_COPY
                    names.add(dynsym.get_symbol(reloc["r_info_sym"]).name)
        return names


def _text_relocations(patch_path: Path) -> tuple[ELFFile, bytes, list[tuple[int, int, object]]]:
    """The patch image, its .kpatch.text bytes and (offset, type, symbol) of its relocations."""
    image = ELFFile(io.BytesIO(patchfile.load_patch(str(patch_path)).elf_image))
    symtab = image.get_section_by_name(".symtab")
    relocations = [(reloc["r_offset"], reloc["r_info_type"], symtab.get_symbol(reloc["r_info_sym"]))
                   for reloc in image.get_section_by_name(".rela.kpatch.text").iter_relocations()]
    return image, image.get_section_by_name(".kpatch.text").data(), relocations


def test_both_executables_get_a_patch(built):
    patches = sorted(path.name for path in (built / "patchroot").glob("*.kpatch"))
    assert patches == sorted(f"{_build_id(_original(built, program))}.kpatch" for program in PROGRAMS)


@pytest.mark.parametrize("program", PROGRAMS)
def test_the_patched_link_adds_no_copy_relocation(built, program):
    original = _copy_relocated(_original(built, program))
    assert {name.split("@")[0] for name in original} == {"stdout"}
    assert _copy_relocated(_patched(built, program)) == original


@pytest.mark.parametrize("program", PROGRAMS)
def test_imported_data_is_reached_through_the_got(built, program):
    _, _, relocations = _text_relocations(_patch_path(built, program))
    by_name = {symbol.name.split("@")[0]: (rtype, symbol) for _, rtype, symbol in relocations}
    for name in ("stderr", "imported_errors"):
        rtype, symbol = by_name[name]
        assert rtype in GOT_TYPES.values(), (name, rtype)
        assert symbol["st_shndx"] == "SHN_UNDEF"    # the loader's jump-table word is the GOT slot


@pytest.mark.parametrize("program", PROGRAMS)
def test_data_the_original_copy_relocates_is_reached_in_that_copy(built, program):
    """stdout lives in the executable's .bss: the patch's GOT load became a lea of that copy."""
    image, text, relocations = _text_relocations(_patch_path(built, program))
    [(offset, rtype, symbol)] = [entry for entry in relocations if entry[2].name.split("@")[0] == "stdout"]
    assert image.get_section(symbol["st_shndx"]).name == ".bss"
    with open(_original(built, program), "rb") as stream:
        original = ELFFile(stream)
        bss = original.get_section_by_name(".bss")
        [copy] = [s for s in original.get_section_by_name(".symtab").iter_symbols()
                  if s.name.split("@")[0] == "stdout" and s["st_shndx"] != "SHN_UNDEF"]
        assert symbol["st_value"] == copy["st_value"] - bss["sh_addr"]
    if rtype in GOT_TYPES.values():
        assert text[offset - 2] == LEA_OPCODE


class _Program:
    """A running fixture program; stdout and stderr lines collected separately."""

    def __init__(self, binary: Path, libdir: Path) -> None:
        self.process = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "LD_LIBRARY_PATH": str(libdir)})
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, lines: list[str], pattern: str, count: int = 1, timeout: float = 10.0) -> list[re.Match]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in map(re.compile(pattern).fullmatch, list(lines)) if m]
            if len(found) >= count:
                return found
            assert self.process.poll() is None, f"exited with {self.process.returncode}: {self.out[-3:]} {self.err}"
            time.sleep(0.01)
        raise AssertionError(f"no {count} lines like {pattern!r}; last: {lines[-3:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)


@pytest.mark.parametrize("program", PROGRAMS)
def test_the_patch_works_in_the_running_program(built, program):
    root = built / "lpmake" / "usr" / "local"
    patient = _Program(root / "bin" / program, root / "lib")
    try:
        patient.wait_for(patient.out, r"imported UNPATCHED \d+ errors=7", count=2)
        result = subprocess.run([CTL, "patch", "-p", str(patient.process.pid), str(built / "patchroot")],
                                capture_output=True, text=True, check=False, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        patched = patient.wait_for(patient.out, r"imported PATCHED (\d+) errors=(\d+)", count=3)
        counters = [int(m.group(1)) for m in patched]
        errors = [int(m.group(2)) for m in patched]
        # The store reaches the library's variable: one more per line, from its old value.
        assert errors[0] >= 8
        assert [error - errors[0] for error in errors] == [counter - counters[0] for counter in counters]
        # The load of stderr reaches libc's stream.
        said = patient.wait_for(patient.err, r"imported stderr (\d+)", count=3)
        assert {int(m.group(1)) for m in said} >= set(counters[:2])
        # Unpatched again: the original code runs, the library's variable keeps its count.
        result = subprocess.run([CTL, "unpatch", "-p", str(patient.process.pid)], capture_output=True, text=True,
                                check=False, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        seen = len(patient.out)
        deadline = time.monotonic() + 10
        while not any("UNPATCHED" in line for line in patient.out[seen:]) and time.monotonic() < deadline:
            time.sleep(0.01)
        back = [re.fullmatch(r"imported UNPATCHED \d+ errors=(\d+)", line) for line in patient.out[seen:]]
        assert [m for m in back if m] and int(next(m for m in back if m).group(1)) >= errors[-1]
        assert patient.process.poll() is None
    finally:
        patient.stop()
