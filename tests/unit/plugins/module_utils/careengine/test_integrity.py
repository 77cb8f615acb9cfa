"""SHA256SUMS and OpenSSH signatures of patch stores: real files, real ssh-keygen."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from plugins.module_utils.careengine import integrity
from plugins.module_utils.careengine.errors import CareError
from plugins.module_utils.careengine.integrity import IntegrityError, SignatureError
from plugins.module_utils.careengine.patchfile import load_patch, make_patch, save_patch
from plugins.module_utils.careengine.storage import PatchSource, PatchStore

BUILD_ID = "ab" * 20


def _elf_image() -> bytes:
    """The smallest relocatable x86_64 ELF header the patch format accepts."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    header[16:18] = (1).to_bytes(2, "little")      # ET_REL
    header[18:20] = (62).to_bytes(2, "little")     # EM_X86_64
    header[52:54] = (64).to_bytes(2, "little")
    header[58:60] = (64).to_bytes(2, "little")
    return bytes(header)


def _store(tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "store"
    path = Path(PatchStore(str(store)).install(make_patch(BUILD_ID, _elf_image(), build_time=1), 1))
    return store, path


def _keygen(directory: Path, name: str) -> tuple[Path, str]:
    """A new ed25519 key pair; (private key path, public key line)."""
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key, (directory / f"{name}.pub").read_text().strip()


def _allowed(directory: Path, principal: str, public_key: str) -> Path:
    allowed = directory / f"allowed-{principal}"
    allowed.write_text(f'{principal} namespaces="{integrity.SIGNATURE_NAMESPACE}" {public_key}\n')
    return allowed


def test_install_writes_sums_in_sha256sum_format(tmp_path):
    store, path = _store(tmp_path)
    line = (store / "SHA256SUMS").read_text()
    assert line == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {BUILD_ID}/1/kpatch.bin\n"
    # sha256sum itself agrees with the file
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=store, check=True)


def test_verified_store_hands_out_listed_patch(tmp_path):
    store, _ = _store(tmp_path)
    source = PatchSource(str(store))
    found = source.find(BUILD_ID)
    assert source.load(found).build_id == BUILD_ID
    assert source.verified and source.signer is None


def test_changed_patch_is_refused_with_its_digest(tmp_path):
    store, path = _store(tmp_path)
    patch = load_patch(str(path))
    tampered = replace(patch, elf_image=patch.elf_image[:-1] + b"\xcc")    # the CRC is recomputed
    save_patch(tampered, str(path))
    source = PatchSource(str(store))
    with pytest.raises(IntegrityError, match=r"SHA-256 [0-9a-f]{64} differs from [0-9a-f]{64} listed in"):
        source.load(source.find(BUILD_ID))
    assert PatchSource(str(store), verify=False).load(source.find(BUILD_ID)).build_id == BUILD_ID


def test_unlisted_patch_and_missing_sums_are_refused(tmp_path):
    store, path = _store(tmp_path)
    (store / "SHA256SUMS").write_text("")
    source = PatchSource(str(store))
    with pytest.raises(IntegrityError, match="is not listed in"):
        source.load(source.find(BUILD_ID))
    (store / "SHA256SUMS").unlink()
    with pytest.raises(IntegrityError, match="has no SHA256SUMS"):
        PatchSource(str(store))


def test_single_file_is_checked_against_its_own_directory(tmp_path):
    _, path = _store(tmp_path)
    single = tmp_path / "flat" / f"{BUILD_ID}.kpatch"
    single.parent.mkdir()
    single.write_bytes(path.read_bytes())
    with pytest.raises(IntegrityError, match="has no SHA256SUMS"):
        PatchSource(str(single))
    assert PatchSource(str(single), verify=False).build_ids() == [BUILD_ID]
    integrity.write_sums(str(single.parent))
    assert PatchSource(str(single)).build_ids() == [BUILD_ID]
    single.write_bytes(path.read_bytes()[:-16] + b"\x90" * 16)
    with pytest.raises(IntegrityError, match="differs from"):
        PatchSource(str(single))


def test_malformed_sums_line_is_named(tmp_path):
    store, _ = _store(tmp_path)
    (store / "SHA256SUMS").write_text("not a digest\n")
    with pytest.raises(IntegrityError, match="line 1 is not"):
        PatchSource(str(store))


def test_signature_by_allowed_key_names_the_signer(tmp_path):
    store, _ = _store(tmp_path)
    key, public = _keygen(tmp_path, "builder")
    integrity.sign_sums(str(store), str(key))
    assert (store / "SHA256SUMS.sig").read_text().startswith("-----BEGIN SSH SIGNATURE-----")
    allowed = _allowed(tmp_path, "builder@example", public)
    source = PatchSource(str(store), allowed_signers=str(allowed))
    assert source.signer == "builder@example"
    assert source.load(source.find(BUILD_ID)).build_id == BUILD_ID


def test_unsigned_wrongly_signed_and_resigned_sums_are_refused(tmp_path):
    store, _ = _store(tmp_path)
    good_key, good_public = _keygen(tmp_path, "builder")
    bad_key, _ = _keygen(tmp_path, "intruder")
    allowed = _allowed(tmp_path, "builder@example", good_public)
    with pytest.raises(SignatureError, match="is not signed"):
        PatchSource(str(store), allowed_signers=str(allowed))
    integrity.sign_sums(str(store), str(bad_key))
    with pytest.raises(SignatureError, match="does not allow"):
        PatchSource(str(store), allowed_signers=str(allowed))
    integrity.sign_sums(str(store), str(good_key))
    sums = store / "SHA256SUMS"
    sums.write_text(sums.read_text().replace(sums.read_text()[:8], "00000000"))   # changed after signing
    with pytest.raises(SignatureError, match="does not verify"):
        PatchSource(str(store), allowed_signers=str(allowed))


def test_installing_again_drops_a_stale_signature(tmp_path):
    store, _ = _store(tmp_path)
    key, _ = _keygen(tmp_path, "builder")
    integrity.sign_sums(str(store), str(key))
    PatchStore(str(store)).install(make_patch(BUILD_ID, _elf_image() + b"\0" * 16, build_time=1), 2)
    assert not (store / "SHA256SUMS.sig").exists()
    assert len((store / "SHA256SUMS").read_text().splitlines()) == 2


def test_errors_are_care_errors():
    assert issubclass(IntegrityError, CareError) and issubclass(SignatureError, IntegrityError)
    with pytest.raises(IntegrityError, match="exclude each other"):
        PatchSource("/", verify=False, allowed_signers="/dev/null")
