"""Bad patches are refused before the patient is touched: real patches from
libcare-patch-make, mutated with patchfile's own encoder, offered to a live patient.

Each test checks the one-line reason and that the patient is untouched: the bytes of the
function the patch replaces and the patient's maps are unchanged, and it goes on printing
its old output.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from apply_helpers import Built, build_id_of, ctl
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine import integrity
from plugins.module_utils.careengine.apply.object_files import ObjectFile
from plugins.module_utils.careengine.patchfile import PatchFile, load_patch, save_patch
from plugins.module_utils.careengine.process import mapped_objects, read_memory

RELA_SIZE = 24


def _code(pid: int, path: Path, name: str) -> bytes:
    mapped = next(o for o in mapped_objects(pid) if o.path == str(path))
    with open(path, "rb") as stream:
        symbol = ObjectFile(str(path), stream).lookup_local(name)
    return read_memory(pid, mapped.load_bias + symbol.vaddr, symbol.size)


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as stream:
        return stream.read()


def _section(patch: PatchFile, name: str) -> tuple[int, int]:
    """(file offset in the ELF image, size) of section ``name``."""
    import io

    section = ELFFile(io.BytesIO(patch.elf_image)).get_section_by_name(name)
    return section["sh_offset"], section["sh_size"]


def _set_rela(patch: PatchFile, rela: str, number: int, *, offset: int | None = None, symbol: int | None = None,
              addend_delta: int = 0) -> PatchFile:
    """``patch`` with relocation ``number`` of section ``rela`` changed (the CRC is recomputed on save)."""
    start, _ = _section(patch, rela)
    image = bytearray(patch.elf_image)
    place = start + number * RELA_SIZE
    r_offset, r_info, r_addend = struct.unpack_from("<QQq", image, place)
    if offset is not None:
        r_offset = offset
    if symbol is not None:
        r_info = (symbol << 32) | (r_info & 0xFFFFFFFF)
    struct.pack_into("<QQq", image, place, r_offset, r_info, r_addend + addend_delta)
    return replace(patch, elf_image=bytes(image))


def _symbol_index(patch: PatchFile, name: str) -> int:
    import io

    symtab = ELFFile(io.BytesIO(patch.elf_image)).get_section_by_name(".symtab")
    for index, symbol in enumerate(symtab.iter_symbols()):
        if symbol.name == name or (symbol["st_info"]["type"] == "STT_SECTION"
                                   and ELFFile(io.BytesIO(patch.elf_image)).get_section(symbol["st_shndx"]).name == name):
            return index
    raise AssertionError(f"no symbol {name}")


def _write(directory: Path, patch: PatchFile) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{patch.build_id}.kpatch"
    save_patch(patch, str(path))
    return path


def _assert_refused(built: Built, start, argv: list[str], expected: str) -> str:
    """Run ``libcare-ctl patch -p PID *argv`` against a fresh patient of ``built``; it must fail with
    one line containing ``expected`` (the reason) and leave the patient as it was."""
    patient = start(built)
    name = "report" if built.binary.name == "nonpie" else "app_report"
    code_before = _code(patient.pid, built.binary, name)
    maps_before = _maps(patient.pid)
    result = ctl("patch", "-p", str(patient.pid), *argv)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # one line gives the reason (a refused object adds the summary "Failed to apply patch ...")
    reasons = [line for line in lines if expected in line]
    assert len(reasons) == 1 and len(lines) <= 2, result.stderr
    assert len(lines) == 1 or lines[1].startswith("Failed to apply patch"), result.stderr
    assert _code(patient.pid, built.binary, name) == code_before
    assert _maps(patient.pid) == maps_before
    patient.wait_for(lambda line: "UNPATCHED" in line)       # a new line: still running its old code
    assert patient.alive()
    return reasons[0]


def _nonpie_patch(nonpie: Built) -> PatchFile:
    return load_patch(str(nonpie.patch_of(nonpie.binary)))


def test_tampered_code_with_recomputed_crc_is_refused_by_sha256sums(nonpie, start, tmp_path):
    store = Path(shutil.copytree(nonpie.patches_dir, tmp_path / "store"))
    patch = _nonpie_patch(nonpie)
    text, _ = _section(patch, ".kpatch.text")
    image = bytearray(patch.elf_image)
    image[text] = 0xCC                                   # int3 at the new function's first byte
    save_patch(replace(patch, elf_image=bytes(image)), str(store / f"{patch.build_id}.kpatch"))
    load_patch(str(store / f"{patch.build_id}.kpatch"))  # the CRC-32 alone would let it through
    line = _assert_refused(nonpie, start, [str(store)], "differs from")
    assert "SHA256SUMS" in line
    # the single file is checked against the SHA256SUMS beside it too
    _assert_refused(nonpie, start, [str(store / f"{patch.build_id}.kpatch")], "differs from")


def _keygen(directory: Path, name: str) -> tuple[Path, str]:
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key, (directory / f"{name}.pub").read_text().strip()


def test_rewritten_sums_signed_by_a_key_not_allowed_are_refused(nonpie, start, tmp_path):
    _, builder_public = _keygen(tmp_path, "builder")
    intruder, _ = _keygen(tmp_path, "intruder")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'builder@example namespaces="libcare-livepatch" {builder_public}\n')
    store = Path(shutil.copytree(nonpie.patches_dir, tmp_path / "store"))
    patch = _nonpie_patch(nonpie)
    text, _ = _section(patch, ".kpatch.text")
    image = bytearray(patch.elf_image)
    image[text] = 0xCC
    save_patch(replace(patch, elf_image=bytes(image)), str(store / f"{patch.build_id}.kpatch"))
    integrity.write_sums(str(store))                     # digests match the tampered file now ...
    integrity.sign_sums(str(store), str(intruder))       # ... and are signed, by the wrong key
    line = _assert_refused(nonpie, start, ["--allowed-signers", str(allowed), str(store)], "does not allow")
    assert "SHA256SUMS.sig" in line


def test_signed_store_applies_and_reports_its_signer(nonpie, start, tmp_path):
    builder, builder_public = _keygen(tmp_path, "builder")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'builder@example namespaces="libcare-livepatch" {builder_public}\n')
    store = Path(shutil.copytree(nonpie.patches_dir, tmp_path / "store"))
    integrity.sign_sums(str(store), str(builder))
    patient = start(nonpie)
    result = ctl("patch", "-p", str(patient.pid), "--json", "--allowed-signers", str(allowed), str(store))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["integrity"] == {"verified": True, "signer": "builder@example"}
    assert report["processes"][0]["objects"][0]["action"] == "applied"
    patient.wait_for(lambda line: line.startswith("nonpie PATCHED"))
    assert ctl("unpatch", "-p", str(patient.pid)).returncode == 0
    patient.wait_for(lambda line: line.startswith("nonpie UNPATCHED"))


def test_unverified_file_needs_no_verify_and_says_so(nonpie, start, tmp_path):
    single = _write(tmp_path / "loose", _nonpie_patch(nonpie))
    _assert_refused(nonpie, start, [str(single)], "has no SHA256SUMS")
    patient = start(nonpie)
    result = ctl("patch", "--no-verify", "-p", str(patient.pid), str(single))
    assert result.returncode == 0, result.stderr
    assert "NOT verified" in result.stdout
    patient.wait_for(lambda line: line.startswith("nonpie PATCHED"))


def test_forged_build_id_is_refused(libdemo, nonpie, start, tmp_path):
    """The demo program's patch with the nonpie program's build-id in its header."""
    forged = load_patch(str(libdemo.patch_of(libdemo.binary)))
    forged = replace(forged, header=replace(forged.header, build_id=build_id_of(nonpie.binary)))
    path = _write(tmp_path / "forged", forged)
    line = _assert_refused(nonpie, start, ["--no-verify", str(path)], "app_report")
    assert "daddr" in line


def test_relocation_outside_its_section_is_refused(nonpie, start, tmp_path):
    patch = _nonpie_patch(nonpie)
    _, text_size = _section(patch, ".kpatch.text")
    # still inside the ELF image (the old check), but past the end of .kpatch.text
    bad = _write(tmp_path / "reloc", _set_rela(patch, ".rela.kpatch.text", 0, offset=text_size - 2))
    line = _assert_refused(nonpie, start, ["--no-verify", str(bad)], "lies outside .kpatch.text")
    assert f"offset {text_size - 2:#x}" in line


def test_new_function_address_outside_the_text_is_refused(nonpie, start, tmp_path):
    patch = _nonpie_patch(nonpie)
    bad = _write(tmp_path / "saddr", _set_rela(patch, ".rela.kpatch.info", 1, addend_delta=1 << 20))
    line = _assert_refused(nonpie, start, ["--no-verify", str(bad)], "saddr .kpatch.text+0x100000")
    assert "lies outside .kpatch.text" in line


def test_new_code_in_a_writable_section_is_refused(nonpie, start, tmp_path):
    patch = _nonpie_patch(nonpie)
    bad = _write(tmp_path / "data", _set_rela(patch, ".rela.kpatch.info", 1,
                                              symbol=_symbol_index(patch, ".kpatch.data")))
    _assert_refused(nonpie, start, ["--no-verify", str(bad)], "is not in an executable section")


def test_replaced_function_address_that_is_not_its_symbol_is_refused(nonpie, start, tmp_path):
    patch = _nonpie_patch(nonpie)
    bad = _write(tmp_path / "daddr", _set_rela(patch, ".rela.kpatch.info", 0, addend_delta=4))
    line = _assert_refused(nonpie, start, ["--no-verify", str(bad)], "is not the symbol report")
    assert "daddr 0x" in line


@pytest.mark.parametrize("store_kind", ["flat", "levels"])
def test_unlisted_patch_in_a_store_is_refused(nonpie, start, tmp_path, store_kind):
    store = Path(shutil.copytree(nonpie.patches_dir, tmp_path / "store"))
    if store_kind == "levels":
        shutil.rmtree(store)
        from apply_helpers import install
        install(store, nonpie.patch_of(nonpie.binary), 1)
    (store / "SHA256SUMS").write_text("")
    _assert_refused(nonpie, start, [str(store)], "is not listed in")
