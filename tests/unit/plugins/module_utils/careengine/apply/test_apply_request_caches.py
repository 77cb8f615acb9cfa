"""What the engine keeps between requests (the resident service runs many): the parse of a
patch and its validation against a target are reused only for that very patch, header and
bytes; a twin that shares a CRC-32 with it, or a mutation of it, gets its own. A source's
admission (owner and mode) is reused only by the one patch call that follows it."""

from __future__ import annotations

import os
import shutil
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

from plugins.module_utils.careengine import integrity
from plugins.module_utils.careengine.apply import operations
from plugins.module_utils.careengine.apply.image import read_patch_image
from plugins.module_utils.careengine.apply.object_files import ObjectFile
from plugins.module_utils.careengine.apply.validate import TargetMismatch, validate
from plugins.module_utils.careengine.errors import InsecureStore
from plugins.module_utils.careengine.patchbuild.project_build import build_patches
from plugins.module_utils.careengine.patchfile import PatchFile, decode_patch
from plugins.module_utils.careengine.storage import PatchStore

ROOT = Path(__file__).resolve().parents[6]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[PatchFile, Path]:
    project = Path(shutil.copytree(ROOT / "tests" / "fixtures" / "projects" / "nonpie",
                                   tmp_path_factory.mktemp("caches") / "nonpie"))
    result = build_patches(str(project), [str(project / "fix.patch")], make_args=[f"CC={ROOT / 'bin' / 'libcare-cc'}"])
    [patch] = result.patches
    return decode_patch(Path(patch.path).read_bytes()), Path(patch.object)


def _forge_crc32(data: bytearray, at: int, wanted: int) -> None:
    """Set ``data[at:at + 4]`` so that the CRC-32 of ``data`` is ``wanted`` (CRC-32 is affine
    in those 32 bits: solve over GF(2))."""
    def crc_with(value: int) -> int:
        data[at:at + 4] = value.to_bytes(4, "little")
        return zlib.crc32(data)

    base = crc_with(0)
    basis: list[tuple[int, int]] = []        # (effect on the CRC, bits set), distinct leading bits
    for bit in range(32):
        effect, bits = crc_with(1 << bit) ^ base, 1 << bit
        for known_effect, known_bits in basis:
            if effect ^ known_effect < effect:
                effect, bits = effect ^ known_effect, bits ^ known_bits
        if effect:
            basis = sorted([*basis, (effect, bits)], reverse=True)
    missing, chosen = wanted ^ base, 0
    for known_effect, known_bits in basis:
        if missing ^ known_effect < missing:
            missing, chosen = missing ^ known_effect, chosen ^ known_bits
    assert missing == 0
    crc_with(chosen)


def _crc_twin(patch: PatchFile) -> PatchFile:
    """``patch`` with other bytes in the middle of its ELF image and the same CRC-32 and size."""
    raw = bytearray(patch.elf_image)
    middle = len(raw) // 2
    raw[middle] ^= 0xFF
    _forge_crc32(raw, middle + 8, zlib.crc32(patch.elf_image))
    return replace(patch, elf_image=bytes(raw))


def test_a_patch_with_the_same_crc32_and_size_gets_its_own_parse_with_its_own_bytes(built):
    patch, _ = built
    twin = _crc_twin(patch)
    assert zlib.crc32(twin.elf_image) == zlib.crc32(patch.elf_image) and twin.elf_image != patch.elf_image
    assert read_patch_image(patch).patch.elf_image == patch.elf_image
    assert read_patch_image(twin).patch.elf_image == twin.elf_image   # what would be written into processes
    assert read_patch_image(replace(patch, elf_image=bytes(patch.elf_image))) is read_patch_image(patch)


def test_a_patch_validated_once_does_not_vouch_for_a_changed_one(built):
    patch, target_path = built
    with open(target_path, "rb") as stream:
        target = ObjectFile(str(target_path), stream)
        validate(read_patch_image(patch), target, str(target_path))
        validate(read_patch_image(patch), target, str(target_path))       # again: remembered, still passes
        other_build = replace(patch, header=replace(patch.header, build_id="ab" * 20))
        with pytest.raises(TargetMismatch, match="is not the build-id"):
            validate(read_patch_image(other_build), target, str(target_path))
        with pytest.raises(TargetMismatch):                              # and not remembered as failed either
            validate(read_patch_image(other_build), target, str(target_path))


@pytest.fixture
def root_store(built, tmp_path) -> Path:
    """A store with the built patch, root's and closed to others, its SHA256SUMS written."""
    patch, _ = built
    root = tmp_path / "store"
    root.mkdir(mode=0o755)
    PatchStore(str(root)).install(patch, 1)
    integrity.write_sums(str(root))
    return root


@pytest.mark.skipif(os.geteuid() != 0, reason="the store's owner must be root")
def test_patch_processes_checks_a_source_again_unless_admit_source_just_let_it_in(root_store, tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    admitted = operations.admit_source(str(root_store), audit_log=audit)
    root_store.chmod(0o775)                                  # its group may write now
    assert operations.patch_processes(admitted, [], audit_log=audit) == []   # the admission it follows
    with pytest.raises(InsecureStore, match="writable by group"):          # used once only
        operations.patch_processes(admitted, [], audit_log=audit)
    with pytest.raises(InsecureStore, match="writable by group"):          # opened, never admitted
        operations.patch_processes(operations.open_source(str(root_store)), [], audit_log=audit)
    root_store.chmod(0o755)
    insecure = operations.admit_source(str(root_store), audit_log=audit, insecure_store=True)
    root_store.chmod(0o775)
    with pytest.raises(InsecureStore, match="writable by group"):          # admitted less strictly than asked
        operations.patch_processes(insecure, [], audit_log=audit)
