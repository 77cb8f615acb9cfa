"""Finding the patient's frame registry and a patch's unwind tables in an applied
mapping: which object provides the registry, where .kpatch.eh_frame, libgcc's object
and the call stub are read back from the mapping's bytes, and what a damaged mapping
gives (nothing). The registration protocol itself is tested live, with the engine
killed at each point (tests/integration/patchbuild/test_cxx_exceptions_live.py)."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from io import BytesIO

import pytest
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine.apply import unwind_registry
from plugins.module_utils.careengine.process.sigframe import CALL_RETURN_STUB


@dataclass(frozen=True)
class _Object:
    path: str


def test_registry_comes_from_the_first_object_defining_both_functions():
    symbols = {
        "/usr/bin/app": {"__register_frame_info": 0x1000},                       # one of the two only
        "/lib/libgcc_s.so.1": {"__register_frame_info": 0x7000, "__deregister_frame_info": 0x7100},
        "/lib/other.so": {"__register_frame_info": 0x9000, "__deregister_frame_info": 0x9100},
    }
    objects = [_Object(path) for path in symbols]
    symbols["/lib/libgcc_s.so.1"]["_Unwind_Find_FDE"] = 0x7200
    found = unwind_registry.find_registry(objects, lambda mapped, name: symbols[mapped.path].get(name))
    assert found == unwind_registry.FrameRegistry(0x7000, 0x7100, "/lib/libgcc_s.so.1", 0x7200)
    assert unwind_registry.find_registry(objects[:1], lambda mapped, name: symbols[mapped.path].get(name)) is None


@pytest.fixture(scope="module")
def image_bytes(tmp_path_factory) -> bytes:
    """A relocatable object with the sections of a patch with unwind tables."""
    work = tmp_path_factory.mktemp("ehimage")
    (work / "image.s").write_text(
        '\t.section\t.kpatch.text,"ax",@progbits\n\tret\n'
        '\t.section\t.kpatch.data,"aw",@progbits\n\t.balign 8\n\t.zero 12\n'
        '\t.section\t.kpatch.eh_frame,"a",@progbits\n\t.balign 8\n\t.quad 0x1122334455667788\n'
        '\t.section\t.kpatch.eh_object,"aw",@progbits\n\t.balign 8\n\t.zero 96\n')
    subprocess.run(["as", "-o", str(work / "image.o"), str(work / "image.s")], check=True)
    return (work / "image.o").read_bytes()


def _section_offset(image: bytes, name: str) -> int:
    return ELFFile(BytesIO(image)).get_section_by_name(name)["sh_offset"]


def test_tables_are_found_in_the_mapped_image_and_its_data_pages(image_bytes):
    kpatch_offset, start, data_start = 688, 0x400000, 0x402000
    contents = bytes(kpatch_offset) + image_bytes
    tables = unwind_registry.tables_in_mapping(start, contents, kpatch_offset, data_start, 0x400800)
    expected = start + kpatch_offset + _section_offset(image_bytes, ".kpatch.eh_frame")
    assert tables == unwind_registry.MappedTables(expected, data_start + 16, 0x400800)   # after .kpatch.data's 12
    assert contents[expected - start:expected - start + 8] == (0x1122334455667788).to_bytes(8, "little")


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "no-section"])
def test_a_mapping_without_readable_tables_gives_none(image_bytes, damage):
    kpatch_offset = 688
    image = image_bytes
    if damage == "zeroed":
        image = bytes(len(image_bytes))
    elif damage == "truncated":
        image = image_bytes[:100]
    else:
        image = image_bytes.replace(b".kpatch.eh_frame", b".kpatch.other_xx")
    assert unwind_registry.tables_in_mapping(0x400000, bytes(kpatch_offset) + image, kpatch_offset, 0x402000,
                                             0) is None


def test_the_return_stub_is_found_after_the_undo_area_or_not_at_all():
    user_undo, entries = 0x1000, 3                   # undo area: 15 bytes, stub at the next 16-byte boundary
    contents = bytearray(0x2000)
    contents[0x1010:0x1010 + len(CALL_RETURN_STUB)] = CALL_RETURN_STUB
    assert unwind_registry.return_stub_in_mapping(0x7000_0000, bytes(contents), user_undo, entries) == 0x7000_1010
    assert unwind_registry.return_stub_in_mapping(0x7000_0000, bytes(0x2000), user_undo, entries) == 0


def test_tables_are_remembered_by_the_exact_image_bytes(image_bytes):
    """The parse is cached by the digest of the bytes it reads: the same image at other
    addresses gives its own addresses, and an image of the same length whose section
    names differ is parsed again (no tables), not taken for the first."""
    unwind_registry._OFFSETS_CACHE.clear()
    first = unwind_registry.tables_in_mapping(0x400000, bytes(688) + image_bytes, 688, 0x402000, 0x400800)
    assert len(unwind_registry._OFFSETS_CACHE) == 1
    moved = unwind_registry.tables_in_mapping(0x700000, bytes(4096) + image_bytes, 4096, 0x703000, 0x700900)
    assert len(unwind_registry._OFFSETS_CACHE) == 1                    # the same image bytes: one parse
    assert moved == unwind_registry.MappedTables(first.eh_frame - 0x400000 - 688 + 0x700000 + 4096,
                                                 0x703000 + 16, 0x700900)
    renamed = image_bytes.replace(b".kpatch.eh_frame", b".kpatch.other_xx")
    assert len(renamed) == len(image_bytes)
    assert unwind_registry.tables_in_mapping(0x400000, bytes(688) + renamed, 688, 0x402000, 0x400800) is None
    assert unwind_registry.tables_in_mapping(0x400000, bytes(688) + image_bytes[:-1], 688, 0x402000, 0) is None
    assert len(unwind_registry._OFFSETS_CACHE) == 3


def test_the_tables_cache_is_bounded(image_bytes):
    unwind_registry._OFFSETS_CACHE.clear()
    for padding in range(unwind_registry.OFFSETS_CACHE_SIZE + 10):
        unwind_registry.tables_in_mapping(0x400000, image_bytes + bytes(padding), 0, 0x402000, 0)
    assert len(unwind_registry._OFFSETS_CACHE) == unwind_registry.OFFSETS_CACHE_SIZE
    oldest = next(iter(unwind_registry._OFFSETS_CACHE))
    assert oldest == hashlib.sha256(image_bytes + bytes(10)).digest()  # the first ten were dropped, in order
