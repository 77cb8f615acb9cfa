"""apply.validate on a real patch and its real target file (built once by the engine): the
unmutated patch passes, each mutated field is named in the refusal; a stripped target is
checked through its FDEs; the instruction-boundary check on raw bytes."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine.apply import image as image_module
from plugins.module_utils.careengine.apply.image import read_patch_image
from plugins.module_utils.careengine.apply.object_files import ObjectFile
from plugins.module_utils.careengine.apply.validate import (
    InvalidPatch,
    TargetMismatch,
    _whole_instructions,
    check_image,
    check_target,
    replaced_vaddrs,
)
from plugins.module_utils.careengine.patchbuild.project_build import build_patches
from plugins.module_utils.careengine.patchfile import PatchFile, decode_patch

ROOT = Path(__file__).resolve().parents[6]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[PatchFile, Path]:
    project = Path(shutil.copytree(ROOT / "tests" / "fixtures" / "projects" / "nonpie",
                                   tmp_path_factory.mktemp("validate") / "nonpie"))
    result = build_patches(str(project), [str(project / "fix.patch")], make_args=[f"CC={ROOT / 'bin' / 'libcare-cc'}"])
    [patch] = result.patches
    return decode_patch(Path(patch.path).read_bytes()), Path(patch.object)


def _open(path: Path) -> ObjectFile:
    return ObjectFile(str(path), open(path, "rb"))  # noqa: SIM115 - closed by the caller's test end


def _rela(patch: PatchFile, section: str, number: int, *, offset=None, addend_delta=0) -> PatchFile:
    elf = ELFFile(io.BytesIO(patch.elf_image))
    place = elf.get_section_by_name(section)["sh_offset"] + 24 * number
    raw = bytearray(patch.elf_image)
    r_offset, r_info, r_addend = struct.unpack_from("<QQq", raw, place)
    struct.pack_into("<QQq", raw, place, r_offset if offset is None else offset, r_info, r_addend + addend_delta)
    return replace(patch, elf_image=bytes(raw))


def test_the_real_patch_passes_and_names_its_function(built):
    patch, target = built
    image = read_patch_image(patch)
    check_image(image)
    check_target(image, _open(target), str(target))
    [(index, name, vaddr, dlen)] = replaced_vaddrs(image)
    symbol = _open(target).lookup_local("report")
    assert (index, name, vaddr, dlen) == (0, "report", symbol.vaddr, symbol.size)


@pytest.mark.parametrize(("section", "number", "change", "message"), [
    (".rela.kpatch.text", 0, {"offset": 0x46}, "lies outside .kpatch.text"),
    (".rela.kpatch.info", 1, {"addend_delta": 0x1000}, "saddr .kpatch.text+0x1000"),
    (".rela.kpatch.info", 0, {"offset": 4}, "overlaps entry 0 outside its daddr/saddr/symstr fields"),
    (".rela.kpatch.info", 2, {"addend_delta": 0x100}, "symstr 0x100 is not an offset into .kpatch.strtab"),
])
def test_fields_contradicting_the_patch_are_named(built, section, number, change, message):
    patch, _ = built
    image_module._images.clear()
    with pytest.raises(InvalidPatch, match=message.replace("+", r"\+").replace(".", r"\.")):
        check_image(read_patch_image(_rela(patch, section, number, **change)))


def test_replaced_address_or_size_not_the_symbols_is_named(built):
    patch, target = built
    moved = read_patch_image(_rela(patch, ".rela.kpatch.info", 0, addend_delta=1))
    with pytest.raises(TargetMismatch, match=r"daddr 0x[0-9a-f]+ dlen \d+ is not the symbol report"):
        check_target(moved, _open(target), str(target))
    other = read_patch_image(replace(patch, header=replace(patch.header, build_id="ab" * 20)))
    with pytest.raises(TargetMismatch, match="header build-id abab.* is not the build-id"):
        check_target(other, _open(target), str(target))


def test_stripped_target_is_checked_through_its_fdes(built, tmp_path):
    patch, target = built
    stripped = tmp_path / "nonpie-stripped"
    subprocess.run(["strip", "-o", str(stripped), str(target)], check=True)
    assert not _open(stripped).has_symtab
    check_target(read_patch_image(patch), _open(stripped), str(stripped))
    moved = read_patch_image(_rela(patch, ".rela.kpatch.info", 0, addend_delta=4))
    with pytest.raises(TargetMismatch, match="has no symbol 'report' and no FDE starts there"):
        check_target(moved, _open(stripped), str(stripped))


@pytest.mark.parametrize(("code", "covered"), [
    (bytes.fromhex("f30f1efa55"), 5),           # endbr64 (4) + push %rbp (1)
    (bytes.fromhex("4883ec08"), 4),             # sub $8,%rsp: one instruction, then nothing more to read
    (bytes.fromhex("06909090909090"), 0),       # 0x06 is no instruction in 64-bit mode
    (bytes.fromhex("e9"), 0),                   # a jmp cut short
])
def test_whole_instructions_under_the_jump(code, covered):
    assert _whole_instructions(code, 0x1000) == covered
