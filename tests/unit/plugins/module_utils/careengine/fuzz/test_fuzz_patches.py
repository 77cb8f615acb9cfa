"""Property-based fuzzing of everything that reads a patch file (issue 8).

Over 10,000 generated and mutated patch files per run, derived from real patches: the
decoder (``decode_patch`` + ``summarize``), ``libcare-dump`` (text and ``--json``) and the
linker that prepares a patch for a target (``read_patch_image``, validation against the
patch and a real target ELF file, ``link_patch``; no process). Each may refuse with a
:class:`CareError` and nothing else: no other exception, no hang. Inputs that once crashed
are kept in ``corpus/`` and replayed by :func:`test_corpus_replays_without_crash`.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time

import pytest
from fuzz_mutants import corpus_files, fuzz_settings, generated_patches, mutated_patches, save_to_corpus
from hypothesis import given
from hypothesis import strategies as st

from plugins.module_utils.careengine import cli
from plugins.module_utils.careengine.apply.image import link_patch, read_patch_image
from plugins.module_utils.careengine.apply.object_files import ObjectFile
from plugins.module_utils.careengine.apply.validate import check_image, check_target
from plugins.module_utils.careengine.errors import CareError
from plugins.module_utils.careengine.patchfile import decode_patch, summarize

DECODER_CASES = 5000
GENERATED_CASES = 1000
DUMP_CASES = 1500
LINKER_CASES = 3000
PIE_BIAS = 0x555555554000
CASE_SECONDS = 10.0    # a case takes milliseconds; this only catches a hang on a loaded machine


def decode(raw: bytes) -> None:
    """The decoder: header, checksum, ELF header, then what the patch replaces."""
    with contextlib.suppress(CareError):
        summarize(decode_patch(raw, source="fuzz"))


def dump(raw: bytes, path: str, as_json: bool) -> None:
    """``libcare-dump [--json] FILE``: an exit status and output, never a traceback."""
    with open(path, "wb") as stream:
        stream.write(raw)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main("dump", (["--json"] if as_json else []) + [path])
    assert status in (0, 1), status
    assert (status == 0) == (err.getvalue() == ""), err.getvalue()


def link(raw: bytes, target: ObjectFile, target_path: str) -> None:
    """Parse, validate against the patch and the target file, and link at a plausible address."""
    try:
        image = read_patch_image(decode_patch(raw, source="fuzz"))
        check_image(image)
        check_target(image, target, target_path)
        bias = 0 if target.elf["e_type"] == "ET_EXEC" else PIE_BIAS
        address = bias + 0x10000000
        imports = {name: address + 0x1000000 + 16 * number for number, name in enumerate(image.imports)}
        link_patch(image, address, bias, imports)
    except CareError:
        pass


class Hang(Exception):
    """One case ran longer than :data:`CASE_SECONDS`."""


def _alarm(signo, frame) -> None:
    raise Hang(f"one case ran longer than {CASE_SECONDS} s")


def _guarded(label: str, raw: bytes, action) -> None:
    """Run ``action`` under a per-case time limit; keep an input that raises anything else than
    CareError (or hangs) in the corpus."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        action()
    except Exception:
        save_to_corpus(raw, label)
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def targets(seeds):
    opened = {seed.name: ObjectFile(str(seed.target), open(seed.target, "rb")) for seed in seeds}  # noqa: SIM115
    yield opened
    for target in opened.values():
        target.close()


def test_decoder_survives_mutated_and_generated_patches(seeds):
    counted = {"mutated": 0, "generated": 0}

    @fuzz_settings(DECODER_CASES)
    @given(mutated_patches(seeds))
    def mutated(raw: bytes) -> None:
        counted["mutated"] += 1
        _guarded("decode", raw, lambda: decode(raw))

    @fuzz_settings(GENERATED_CASES)
    @given(generated_patches())
    def generated(raw: bytes) -> None:
        counted["generated"] += 1
        _guarded("decode", raw, lambda: decode(raw))

    started = time.monotonic()
    mutated()
    generated()
    print(f"decoder: {counted} cases in {time.monotonic() - started:.1f} s")
    assert counted["mutated"] >= DECODER_CASES and counted["generated"] >= GENERATED_CASES


def test_libcare_dump_never_tracebacks(seeds, tmp_path):
    path = str(tmp_path / "mutant.kpatch")
    counted = [0]

    @fuzz_settings(DUMP_CASES)
    @given(mutated_patches(seeds), st.booleans())
    def run(raw: bytes, as_json: bool) -> None:
        counted[0] += 1
        _guarded("dump", raw, lambda: dump(raw, path, as_json))

    started = time.monotonic()
    run()
    print(f"libcare-dump: {counted[0]} cases in {time.monotonic() - started:.1f} s")
    assert counted[0] >= DUMP_CASES


def test_linker_survives_mutated_patches_against_real_targets(seeds, targets):
    counted = [0]
    by_name = {seed.name: seed for seed in seeds}

    @fuzz_settings(LINKER_CASES)
    @given(st.data())
    def run(data) -> None:
        seed = data.draw(st.sampled_from(seeds))
        raw = data.draw(mutated_patches([seed], fix_checksum=True))   # past the CRC, as a forger would
        counted[0] += 1
        _guarded("link", raw, lambda: link(raw, targets[seed.name], str(by_name[seed.name].target)))

    started = time.monotonic()
    run()
    print(f"linker: {counted[0]} cases in {time.monotonic() - started:.1f} s")
    assert counted[0] >= LINKER_CASES


def test_unmutated_seeds_link_and_validate(seeds, targets):
    """The property is not vacuous: the real patches pass every check and link."""
    for seed in seeds:
        image = read_patch_image(decode_patch(seed.raw))
        check_image(image)
        check_target(image, targets[seed.name], str(seed.target))
        bias = 0 if targets[seed.name].elf["e_type"] == "ET_EXEC" else PIE_BIAS
        link_patch(image, bias + 0x10000000, bias, {name: bias + 0x11000000 for name in image.imports})


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_replays_without_crash(path, seeds, targets, tmp_path):
    raw = path.read_bytes()
    decode(raw)
    dump(raw, str(tmp_path / "replay.kpatch"), False)
    dump(raw, str(tmp_path / "replay.kpatch"), True)
    for seed in seeds:
        link(raw, targets[seed.name], str(seed.target))


def test_corpus_is_not_empty():
    assert corpus_files(), f"no regression inputs in {os.path.dirname(__file__)}/corpus"
