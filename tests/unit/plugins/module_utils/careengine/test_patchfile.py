"""The patch file format: round trip, header layout, refusal of damaged input."""

from __future__ import annotations

import random
import struct

import pytest

from plugins.module_utils.careengine import patchfile
from plugins.module_utils.careengine.errors import PatchFormatError

BUILD_ID = "0123456789abcdef0123456789abcdef01234567"


def _elf_image(size: int = 200) -> bytes:
    """A minimal ET_REL x86-64 ELF header followed by filler bytes."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1        # ELFCLASS64, little-endian, version
    struct.pack_into("<HHI", header, 16, 1, 62, 1)   # ET_REL, EM_X86_64, EV_CURRENT
    struct.pack_into("<HHHHHH", header, 52, 64, 0, 0, 64, 0, 0)
    return bytes(header) + bytes(range(256)) * (size // 256) + bytes(size % 256)


def test_round_trip_is_identical():
    image = _elf_image(301)
    patch = patchfile.make_patch(BUILD_ID.upper(), image, level=3, build_time=1234567890)
    raw = patch.to_bytes()
    decoded = patchfile.decode_patch(raw)
    assert decoded.build_id == BUILD_ID
    assert decoded.level == 3
    assert decoded.header.build_time == 1234567890
    assert decoded.elf_image[:len(image)] == image
    assert decoded.elf_image[len(image):] == b"\0" * (len(decoded.elf_image) - len(image))
    assert decoded.to_bytes() == raw
    assert patchfile.decode_patch(decoded.with_level(3).to_bytes()).to_bytes() == raw


def test_header_layout_matches_libcare():
    image = _elf_image(100)
    raw = patchfile.make_patch(BUILD_ID, image, level=2, build_time=42).to_bytes()
    offsets = patchfile.HEADER_OFFSETS
    assert patchfile.HEADER_SIZE == 688
    assert offsets["uname"] == 80 and offsets["build_time"] == 336 and offsets["csum"] == 344
    assert offsets["kpatch_offset"] == 352 and offsets["rel_offset"] == 356
    assert offsets["total_size"] == 360 and offsets["jmp_offset"] == 364
    assert offsets["user_undo"] == 368 and offsets["user_info"] == 372 and offsets["user_level"] == 376
    assert offsets["srcversion"] == 432
    assert raw[:8] == b"KPATCH1\0"
    assert raw[80:80 + 41] == BUILD_ID.encode() + b"\0"
    assert struct.unpack_from("<Q", raw, 336)[0] == 42
    kpatch_offset, rel_offset, total_size = struct.unpack_from("<III", raw, 352)
    assert kpatch_offset == rel_offset == 688
    assert total_size == len(raw) == 688 + (len(image) + 15) // 16 * 16
    assert struct.unpack_from("<I", raw, 376)[0] == 2
    assert raw[688:688 + len(image)] == image
    assert len(raw) % 16 == 0


def test_libcare_style_zero_checksum_is_accepted():
    raw = bytearray(patchfile.make_patch(BUILD_ID, _elf_image()).to_bytes())
    struct.pack_into("<I", raw, 344, 0)
    raw[688 + 70] ^= 0xFF                                # no checksum: nothing to check
    assert patchfile.decode_patch(bytes(raw)).build_id == BUILD_ID


def test_info_entry_round_trip():
    entry = patchfile.InfoEntry(daddr=0x1000, saddr=0x2000, dlen=35, slen=40, symstr=0x3000)
    raw = patchfile.encode_info_entry(entry) + patchfile.info_terminator()
    assert len(raw) == patchfile.INFO_ENTRY_SIZE + patchfile.INFO_TERMINATOR_SIZE
    assert patchfile.decode_info_table(raw) == [entry]
    assert not entry.is_new and patchfile.InfoEntry(0, 0x10, 0, 8).is_new


def _without_checksum(raw: bytearray) -> bytearray:
    struct.pack_into("<I", raw, 344, 0)          # no checksum, so the ELF checks are reached
    return raw


def _set(raw: bytearray, offset: int, value: bytes) -> bytearray:
    raw[offset:offset + len(value)] = value
    return raw


def _pack(raw: bytearray, fmt: str, offset: int, value: int) -> bytearray:
    struct.pack_into(fmt, raw, offset, value)
    return raw


def _flip(raw: bytearray, offset: int) -> bytearray:
    raw[offset] ^= 0x01
    return raw


# Each damage: a valid patch's bytes -> damaged bytes.
DAMAGES = {
    "empty": lambda raw: bytearray(),
    "short_header": lambda raw: raw[:300],
    "bad_magic": lambda raw: _set(raw, 0, b"KPATCH2\0"),
    "truncated_image": lambda raw: raw[:-32],
    "total_size_beyond_file": lambda raw: _pack(raw, "<I", 360, len(raw) + 16),
    "flipped_image_byte": lambda raw: _flip(raw, 688 + 100),
    "not_elf": lambda raw: _set(_without_checksum(raw), 688, b"\0ELF"),
    "not_relocatable": lambda raw: _pack(_without_checksum(raw), "<H", 688 + 16, 2),
    "wrong_machine": lambda raw: _pack(_without_checksum(raw), "<H", 688 + 18, 3),
    "bad_offsets": lambda raw: _pack(raw, "<I", 352, 100),
    "no_build_id": lambda raw: _set(raw, 80, bytes(256)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_patches_are_refused(damage):
    raw = DAMAGES[damage](bytearray(patchfile.make_patch(BUILD_ID, _elf_image()).to_bytes()))
    with pytest.raises(PatchFormatError):
        patchfile.decode_patch(bytes(raw))


def test_random_input_is_refused():
    generator = random.Random(20261125)
    for _ in range(300):
        size = generator.choice([0, 10, 687, 688, 700, 1024, 4096])
        raw = bytes(generator.getrandbits(8) for _ in range(size))
        if generator.random() < 0.5 and size >= 8:
            raw = b"KPATCH1\0" + raw[8:]
        with pytest.raises(PatchFormatError):
            patchfile.decode_patch(raw)


def test_random_corruption_of_a_valid_patch_is_refused():
    generator = random.Random(7)
    good = patchfile.make_patch(BUILD_ID, _elf_image(500)).to_bytes()
    for _ in range(200):
        raw = bytearray(good)
        position = generator.randrange(688, len(raw))
        raw[position] ^= 1 << generator.randrange(8)
        with pytest.raises(PatchFormatError):
            patchfile.decode_patch(bytes(raw))


def test_invalid_build_id_is_refused():
    with pytest.raises(PatchFormatError):
        patchfile.make_patch("not-hex", _elf_image())
    with pytest.raises(PatchFormatError):
        patchfile.make_patch(BUILD_ID, b"\0" * 100)


def test_load_patch_names_the_file(tmp_path):
    path = tmp_path / "x.kpatch"
    path.write_bytes(b"KPATCH1\0" + bytes(100))
    with pytest.raises(PatchFormatError, match="x.kpatch"):
        patchfile.load_patch(str(path))
    patchfile.save_patch(patchfile.make_patch(BUILD_ID, _elf_image()), str(path))
    assert patchfile.load_patch(str(path)).build_id == BUILD_ID
