"""The control socket's format: one JSON object per line each way.

Request: ``{"argv": [...libcare-ctl arguments...], "cwd": "/where/the/client/runs"}``.
Answer: ``{"exit": status, "stdout": text, "stderr": text}``: the client prints them and
exits with that status, exactly as the command would have run locally.

Imports nothing but ``json``: the client uses it on every command-line call.
"""

from __future__ import annotations

import json

DEFAULT_SOCKET = "/run/libcare/ctl.sock"
SOCKET_ENV = "LIBCARE_SOCKET"
MAX_MESSAGE = 16 << 20
FORWARDED_COMMANDS = frozenset({"patch", "unpatch", "info", "patch-user", "unpatch-user", "info-user"})


def encode(message: dict) -> bytes:
    """One line of JSON."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    """The object on one line (ValueError if it is not one)."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message


def receive_line(sock) -> bytes:
    """Read up to the first newline (or end of stream)."""
    chunks = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n") or b"\n" in chunk:
            break
        if size > MAX_MESSAGE:
            raise ValueError("message too long")
    return b"".join(chunks).split(b"\n", 1)[0]
