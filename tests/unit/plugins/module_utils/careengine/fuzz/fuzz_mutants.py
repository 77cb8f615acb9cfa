"""Hypothesis strategies that mutate real patch files where it hurts: the header, the ELF
header, section headers, relocations, symbols and ``.kpatch.info`` records. Half of the
mutants get a recomputed CRC-32 (patchfile's own encoder) so they reach past the checksum."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from plugins.module_utils.careengine.patchfile import HEADER_SIZE, PatchFormatError, decode_header, encode_patch

CORPUS = Path(__file__).resolve().parent / "corpus"

# Deterministic, no example database in the tree, no deadline on a loaded 2-core machine.
FUZZ_SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                     suppress_health_check=list(HealthCheck))

INTERESTING = (0, 1, 2, 4, 5, 7, 8, 16, 23, 24, 48, 64, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x7FFF, 0xFFFF,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF)


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, **FUZZ_SETTINGS)


def interesting_fields(raw: bytes) -> list[tuple[int, int]]:
    """(offset in the file, width) of every structural field of a patch file: the header's
    integers, the ELF header, each section header, relocation, symbol and info record."""
    fields = [(HEADER_SIZE - 688 + offset, 4) for offset in range(328, 400, 4)]
    image = raw[HEADER_SIZE:]
    base = HEADER_SIZE
    fields += [(base + offset, width) for offset, width in
               ((16, 2), (18, 2), (24, 8), (32, 8), (40, 8), (58, 2), (60, 2), (62, 2))]
    try:
        elf = ELFFile(io.BytesIO(image))
        shoff = elf["e_shoff"]
        for index, section in enumerate(elf.iter_sections()):
            header = base + shoff + index * 64
            fields += [(header + offset, width) for offset, width in
                       ((0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 4), (44, 4), (48, 8), (56, 8))]
            start = base + section["sh_offset"]
            if section["sh_type"] == "SHT_RELA":
                for entry in range(section["sh_size"] // 24):
                    fields += [(start + entry * 24, 8), (start + entry * 24 + 8, 4), (start + entry * 24 + 12, 4),
                               (start + entry * 24 + 16, 8)]
            elif section["sh_type"] == "SHT_SYMTAB":
                for entry in range(section["sh_size"] // 24):
                    fields += [(start + entry * 24, 4), (start + entry * 24 + 4, 1), (start + entry * 24 + 6, 2),
                               (start + entry * 24 + 8, 8), (start + entry * 24 + 16, 8)]
            elif section.name == ".kpatch.info":
                for entry in range(section["sh_size"] // 48):
                    fields += [(start + entry * 48 + offset, width) for offset, width in
                               ((0, 8), (8, 8), (16, 4), (20, 4), (24, 8), (32, 8), (40, 4))]
    except Exception:  # noqa: BLE001 - a seed is a valid patch; this only guards the helper itself
        pass
    return [(offset, width) for offset, width in fields if 0 <= offset and offset + width <= len(raw)]


def recompute_checksum(raw: bytes) -> bytes:
    """``raw`` re-encoded by patchfile (CRC-32 and sizes recomputed); unchanged if it cannot be."""
    try:
        header = decode_header(raw)
        return encode_patch(header, raw[HEADER_SIZE:])
    except (PatchFormatError, struct.error, UnicodeEncodeError, ValueError):
        return raw


@st.composite
def mutated_patches(draw, seeds, fix_checksum: bool | None = None) -> bytes:
    """A real patch with 1-4 mutations (structural fields mostly, raw bytes and cuts too).
    ``fix_checksum``: recompute the CRC-32 always (True) or for half of them (None)."""
    seed = draw(st.sampled_from(seeds))
    raw = bytearray(seed.raw)
    fields = _fields_of(seed.raw)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("field", "field", "field", "delta", "byte", "truncate", "insert", "zero")))
        if kind in ("field", "delta") and fields:
            offset, width = draw(st.sampled_from(fields))
            old = int.from_bytes(raw[offset:offset + width], "little")
            if kind == "field":
                value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << (8 * width)) - 1)))
            else:
                value = old + draw(st.integers(-64, 64))
            raw[offset:offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif kind == "byte" and raw:
            position = draw(st.integers(_low(raw, 8), len(raw) - 1))
            raw[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[draw(st.integers(_low(raw, 64), len(raw))):]
        elif kind == "insert":
            position = draw(st.integers(_low(raw, 64), len(raw)))
            raw[position:position] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "zero" and raw:
            start = draw(st.integers(_low(raw, 64), len(raw) - 1))
            length = draw(st.integers(1, 256))
            raw[start:start + length] = bytes(len(raw[start:start + length]))
    result = bytes(raw)
    if fix_checksum or (fix_checksum is None and draw(st.booleans())):
        result = recompute_checksum(result)
    return result


def _low(raw: bytearray, past_elf_header: int) -> int:
    """Where raw mutations start: mostly past the magic numbers (a broken magic is one case,
    not most); hypothesis favours small positions, which would otherwise all hit the header."""
    return min(HEADER_SIZE + past_elf_header, max(len(raw) - 1, 0))


_field_cache: dict[int, list[tuple[int, int]]] = {}


def _fields_of(raw: bytes) -> list[tuple[int, int]]:
    key = hash(raw)
    if key not in _field_cache:
        _field_cache[key] = interesting_fields(raw)
    return _field_cache[key]


def generated_patches() -> st.SearchStrategy[bytes]:
    """Patch files made from scratch: a valid header around arbitrary or ELF-looking bytes."""
    elf_like = st.builds(lambda tail: b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x01\x00\x3e\x00" + tail,
                         st.binary(max_size=600))
    return st.builds(lambda build_id, body: encode_patch_or_raw(build_id, body),
                     st.sampled_from(("ab" * 20, "00", "f" * 254)), st.one_of(elf_like, st.binary(max_size=600)))


def encode_patch_or_raw(build_id: str, body: bytes) -> bytes:
    from plugins.module_utils.careengine.patchfile import PatchHeader

    return encode_patch(PatchHeader(build_id=build_id, level=1), body)


def corpus_files() -> list[Path]:
    """The regression inputs kept from earlier fuzzing (each crashed the engine once)."""
    return sorted(CORPUS.glob("*.kpatch"))


def save_to_corpus(raw: bytes, label: str) -> Path:
    """Keep a crashing input (named by its digest) for the corpus replay test."""
    import hashlib

    CORPUS.mkdir(exist_ok=True)
    path = CORPUS / f"{label}-{hashlib.sha256(raw).hexdigest()[:16]}.kpatch"
    path.write_bytes(raw)
    return path
