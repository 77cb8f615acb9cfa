"""The control socket's format, both ways length-prefixed (``struct`` only: no json, no re).

Request: ``REQUEST`` header (magic, field count) then each field as a 4-byte length and
its UTF-8 bytes: the client's working directory, then the ``libcare-ctl`` arguments.
Answer: ``ANSWER`` header (exit status, stdout length, stderr length), then stdout and
stderr: the client prints them and exits with that status, exactly as the command would
have run locally.

Kept to ``struct`` so that the client (``python -S``, a few imports) costs milliseconds.
"""

from __future__ import annotations

import struct

DEFAULT_SOCKET = "/run/libcare/ctl.sock"
SOCKET_ENV = "LIBCARE_SOCKET"
NO_SERVICE_ENV = "LIBCARE_NO_SERVICE"
MAGIC = 0x4C435431                     # "LCT1"
MAX_MESSAGE = 16 << 20
REQUEST = struct.Struct("<II")          # magic, number of fields
FIELD = struct.Struct("<I")             # length of one field
ANSWER = struct.Struct("<iII")          # exit status, stdout length, stderr length
FORWARDED_COMMANDS = frozenset({"patch", "unpatch", "info", "patch-user", "unpatch-user", "info-user"})


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def encode_request(cwd: str, argv: list[str]) -> bytes:
    """The bytes of a request from directory ``cwd`` for ``libcare-ctl argv``."""
    fields = [_bytes(cwd), *(_bytes(word) for word in argv)]
    return REQUEST.pack(MAGIC, len(fields)) + b"".join(FIELD.pack(len(f)) + f for f in fields)


def decode_request(data: bytes) -> tuple[str, list[str]]:
    """(cwd, argv) of a request; ValueError if it is malformed."""
    if len(data) < REQUEST.size:
        raise ValueError("truncated request")
    magic, count = REQUEST.unpack_from(data)
    if magic != MAGIC or count < 1:
        raise ValueError("not a libcare-ctl request")
    offset = REQUEST.size
    fields = []
    for _ in range(count):
        if offset + FIELD.size > len(data):
            raise ValueError("truncated request")
        (length,) = FIELD.unpack_from(data, offset)
        offset += FIELD.size
        if offset + length > len(data):
            raise ValueError("truncated request")
        fields.append(_text(data[offset:offset + length]))
        offset += length
    return fields[0], fields[1:]


def request_size(data: bytes) -> int | None:
    """The full size of the request ``data`` starts with, once the header allows knowing it
    (None: more bytes needed)."""
    if len(data) < REQUEST.size:
        return None
    _, count = REQUEST.unpack_from(data)
    offset = REQUEST.size
    for _ in range(count):
        if offset + FIELD.size > len(data):
            return None
        (length,) = FIELD.unpack_from(data, offset)
        offset += FIELD.size + length
    return offset


def encode_answer(exit_status: int, stdout: str, stderr: str) -> bytes:
    """The bytes of an answer."""
    out, err = _bytes(stdout), _bytes(stderr)
    return ANSWER.pack(exit_status, len(out), len(err)) + out + err


def decode_answer(data: bytes) -> tuple[int, str, str]:
    """(exit status, stdout, stderr); ValueError if truncated."""
    if len(data) < ANSWER.size:
        raise ValueError("truncated answer")
    exit_status, out_size, err_size = ANSWER.unpack_from(data)
    if len(data) != ANSWER.size + out_size + err_size:
        raise ValueError("truncated answer")
    body = data[ANSWER.size:]
    return exit_status, _text(body[:out_size]), _text(body[out_size:])
