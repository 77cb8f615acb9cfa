"""Integrity of a patch store: ``SHA256SUMS`` beside the patches, and its OpenSSH signature.

A store (or a ``patchroot/``) carries ``SHA256SUMS`` in ``sha256sum``'s format, one line
``<hex digest>  <path relative to the directory>`` per patch file. A patch is applied only
when its bytes have the digest listed for it. ``SHA256SUMS.sig`` is optional: an OpenSSH
signature of ``SHA256SUMS`` (``ssh-keygen -Y sign``, namespace ``libcare-livepatch``),
checked against an ``allowed_signers`` file when the operator gives one.

The CRC-32 in a patch header only detects accidents; these digests detect tampering, and
the signature says who built the store.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess

from .errors import CareError

SUMS_FILENAME = "SHA256SUMS"
SIGNATURE_FILENAME = SUMS_FILENAME + ".sig"
SIGNATURE_NAMESPACE = "libcare-livepatch"
PATCH_FILE_NAMES = ("kpatch.bin",)
PATCH_FILE_SUFFIX = ".kpatch"
SSH_KEYGEN = "ssh-keygen"
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_SSH_TIMEOUT = 30.0


class IntegrityError(CareError):
    """A patch is not listed in its store's ``SHA256SUMS``, or its digest differs."""


class SignatureError(IntegrityError):
    """The store's ``SHA256SUMS`` is unsigned, or not signed by an allowed signer."""


def digest_of(data: bytes) -> str:
    """The SHA-256 of ``data``, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def is_patch_file(name: str) -> bool:
    """Whether a file name is one a store or patchroot keeps a patch under."""
    return name in PATCH_FILE_NAMES or name.endswith(PATCH_FILE_SUFFIX)


def sums_directory(source: str) -> str:
    """Where the ``SHA256SUMS`` of a patch source is: the store itself, or a patch file's directory."""
    return source if os.path.isdir(source) else (os.path.dirname(source) or ".")


def read_sums(directory: str) -> dict[str, str] | None:
    """``{relative path: digest}`` from ``directory/SHA256SUMS``; None when there is none."""
    path = os.path.join(directory, SUMS_FILENAME)
    try:
        with open(path, "rb") as stream:
            text = stream.read().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _SUMS_LINE.match(line)
        if match is None:
            raise IntegrityError(f"{path} line {number} is not '<sha256>  <path>': {line[:80]!r}")
        sums[os.path.normpath(match.group(2))] = match.group(1).lower()
    return sums


def _patch_files(directory: str) -> list[str]:
    """Relative paths of the patch files under ``directory`` (symlinks not followed)."""
    found = []
    for current, subdirs, files in os.walk(directory):
        subdirs[:] = sorted(d for d in subdirs if not os.path.islink(os.path.join(current, d)))
        for name in sorted(files):
            full = os.path.join(current, name)
            if is_patch_file(name) and not os.path.islink(full):
                found.append(os.path.relpath(full, directory))
    return found


def write_sums(directory: str) -> str:
    """(Re)write ``directory/SHA256SUMS`` for every patch file under it; return its path.

    A signature of the previous contents no longer holds, so ``SHA256SUMS.sig`` is removed:
    sign again after changing a store.
    """
    lines = []
    for relative in _patch_files(directory):
        with open(os.path.join(directory, relative), "rb") as stream:
            lines.append(f"{digest_of(stream.read())}  {relative}\n")
    path = os.path.join(directory, SUMS_FILENAME)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write("".join(lines))
    os.replace(temporary, path)
    signature = os.path.join(directory, SIGNATURE_FILENAME)
    if os.path.lexists(signature):
        os.unlink(signature)
    return path


def check_listed(directory: str, sums: dict[str, str], path: str, data: bytes) -> str:
    """Raise :class:`IntegrityError` unless ``data`` (read from ``path``) has the digest
    ``sums`` lists for it; return the digest."""
    relative = os.path.normpath(os.path.relpath(os.path.realpath(path), os.path.realpath(directory)))
    listed = sums.get(relative)
    if listed is None:
        raise IntegrityError(f"{path} is not listed in {os.path.join(directory, SUMS_FILENAME)}: refusing an "
                             "unlisted patch")
    digest = digest_of(data)
    if digest != listed:
        raise IntegrityError(f"{path}: SHA-256 {digest} differs from {listed} listed in "
                             f"{os.path.join(directory, SUMS_FILENAME)}: the patch was changed after it was built")
    return digest


def _ssh_keygen(arguments: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([SSH_KEYGEN, *arguments], input=stdin, capture_output=True, check=False,
                              timeout=_SSH_TIMEOUT)
    except FileNotFoundError:
        raise SignatureError(f"{SSH_KEYGEN} is not installed (package openssh-client): cannot sign or verify "
                             "patch stores") from None
    except subprocess.TimeoutExpired:
        raise SignatureError(f"{SSH_KEYGEN} {arguments[0]} {arguments[1]} did not finish in {_SSH_TIMEOUT:.0f} s"
                             ) from None


def _last_line(output: bytes) -> str:
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def sign_sums(directory: str, key: str) -> str:
    """Sign ``directory/SHA256SUMS`` with the OpenSSH private ``key``; the signature's path."""
    sums = os.path.join(directory, SUMS_FILENAME)
    if not os.path.isfile(sums):
        raise SignatureError(f"{sums} does not exist: nothing to sign")
    if not os.path.isfile(key):
        raise SignatureError(f"signing key {key} does not exist")
    signature = os.path.join(directory, SIGNATURE_FILENAME)
    if os.path.lexists(signature):
        os.unlink(signature)
    done = _ssh_keygen(["-Y", "sign", "-f", key, "-n", SIGNATURE_NAMESPACE, sums], stdin=b"")
    if done.returncode != 0 or not os.path.isfile(signature):
        raise SignatureError(f"signing {sums} with {key} failed: {_last_line(done.stderr)}")
    return signature


def verify_signature(directory: str, allowed_signers: str) -> str:
    """Check ``SHA256SUMS.sig`` against ``allowed_signers``; return the signer's principal.

    Refuses a store without a signature, a signature by a key that ``allowed_signers``
    does not list, and a ``SHA256SUMS`` changed after signing.
    """
    sums = os.path.join(directory, SUMS_FILENAME)
    signature = os.path.join(directory, SIGNATURE_FILENAME)
    if not os.path.isfile(allowed_signers):
        raise SignatureError(f"allowed signers file {allowed_signers} does not exist")
    if not os.path.isfile(signature):
        raise SignatureError(f"{directory} is not signed (no {SIGNATURE_FILENAME}) but --allowed-signers "
                             "requires a signature")
    found = _ssh_keygen(["-Y", "find-principals", "-s", signature, "-f", allowed_signers])
    principals = [line.strip() for line in found.stdout.decode("utf-8", "replace").splitlines() if line.strip()]
    if found.returncode != 0 or not principals:
        raise SignatureError(f"{signature} is signed by a key that {allowed_signers} does not allow")
    try:
        with open(sums, "rb") as stream:
            signed = stream.read()
    except OSError as exc:
        raise SignatureError(f"cannot read {sums}: {exc.strerror}") from None
    for principal in principals:
        verified = _ssh_keygen(["-Y", "verify", "-f", allowed_signers, "-I", principal, "-n", SIGNATURE_NAMESPACE,
                                "-s", signature], stdin=signed)
        if verified.returncode == 0:
            return principal
    raise SignatureError(f"{signature} does not verify {sums} for {', '.join(principals)}: "
                         f"{_last_line(verified.stderr or verified.stdout)}")
