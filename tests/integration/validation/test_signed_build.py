"""libcare-patch-make --sign: a real build whose patchroot and store carry SHA256SUMS and
SHA256SUMS.sig, accepted by libcare-ctl --allowed-signers and by ssh-keygen itself."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from apply_helpers import CC_ARG, FIXTURES, PATCH_MAKE, Patient, ctl


def test_signed_build_is_applied_with_its_signer(tmp_path):
    key = tmp_path / "builder"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "builder", "-f", str(key)], check=True)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'release@example namespaces="libcare-livepatch" {(tmp_path / "builder.pub").read_text()}')
    project = Path(shutil.copytree(FIXTURES / "nonpie", tmp_path / "nonpie"))
    store = tmp_path / "store"
    made = subprocess.run([PATCH_MAKE, "-m", CC_ARG, "--store", str(store), "--sign", str(key), "fix.patch"],
                          cwd=project, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    for directory in (project / "patchroot", store):
        assert (directory / "SHA256SUMS.sig").is_file(), directory
        listed = (directory / "SHA256SUMS").read_text().splitlines()
        assert len(listed) == 1 and listed[0].endswith(("kpatch.bin", ".kpatch")), listed
        subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=directory, check=True)
        with open(directory / "SHA256SUMS", "rb") as sums:
            subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "release@example", "-n",
                            "libcare-livepatch", "-s", str(directory / "SHA256SUMS.sig")], stdin=sums,
                           capture_output=True, check=True)
    patient = Patient([str(project / "lpmake" / "usr" / "local" / "bin" / "nonpie")])
    try:
        patient.wait_for(lambda line: line.startswith("nonpie UNPATCHED"), after=0)
        applied = ctl("patch", "-p", str(patient.pid), "--json", "--allowed-signers", str(allowed), str(store))
        assert applied.returncode == 0, applied.stderr
        report = json.loads(applied.stdout)
        assert report["integrity"] == {"verified": True, "signer": "release@example"}
        assert report["processes"][0]["objects"][0]["action"] == "applied"
        patient.wait_for(lambda line: line.startswith("nonpie PATCHED"))
    finally:
        patient.stop()
