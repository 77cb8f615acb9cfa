"""The control socket's format, both ways length-prefixed; this module imports nothing.

Request: a header (magic, field count) then each field as a 4-byte length and its UTF-8
bytes: the client's working directory, then the ``libcare-ctl`` arguments.
Answer: a header (exit status, stdout length, stderr length), then stdout and stderr: the
client prints them and exits with that status, exactly as the command would have run
locally. Every number is a 4-byte little-endian integer (the exit status signed).

Import-free (``int.to_bytes``, not ``struct``) so that the client (``python -I -S``, see
:mod:`.client_main`) pays for no module it does not use.
"""

DEFAULT_SOCKET = "/run/libcare/ctl.sock"
SOCKET_ENV = "LIBCARE_SOCKET"
NO_SERVICE_ENV = "LIBCARE_NO_SERVICE"
MAGIC = 0x4C435431                     # "LCT1"
MAX_MESSAGE = 16 << 20
NUMBER_SIZE = 4
REQUEST_HEADER_SIZE = 2 * NUMBER_SIZE   # magic, number of fields
ANSWER_HEADER_SIZE = 3 * NUMBER_SIZE    # exit status, stdout length, stderr length
FORWARDED_COMMANDS = frozenset({"patch", "unpatch", "info", "patch-user", "unpatch-user", "info-user"})


def _number(value: int, signed: bool = False) -> bytes:
    return value.to_bytes(NUMBER_SIZE, "little", signed=signed)


def _number_at(data: bytes, offset: int, signed: bool = False) -> int:
    return int.from_bytes(data[offset:offset + NUMBER_SIZE], "little", signed=signed)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def encode_request(cwd: str, argv: list[str]) -> bytes:
    """The bytes of a request from directory ``cwd`` for ``libcare-ctl argv``."""
    fields = [_bytes(cwd), *(_bytes(word) for word in argv)]
    return _number(MAGIC) + _number(len(fields)) + b"".join(_number(len(f)) + f for f in fields)


def decode_request(data: bytes) -> tuple[str, list[str]]:
    """(cwd, argv) of a request; ValueError if it is malformed."""
    if len(data) < REQUEST_HEADER_SIZE:
        raise ValueError("truncated request")
    if _number_at(data, 0) != MAGIC or _number_at(data, NUMBER_SIZE) < 1:
        raise ValueError("not a libcare-ctl request")
    offset = REQUEST_HEADER_SIZE
    fields = []
    for _ in range(_number_at(data, NUMBER_SIZE)):
        if offset + NUMBER_SIZE > len(data):
            raise ValueError("truncated request")
        length = _number_at(data, offset)
        offset += NUMBER_SIZE
        if offset + length > len(data):
            raise ValueError("truncated request")
        fields.append(_text(data[offset:offset + length]))
        offset += length
    return fields[0], fields[1:]


def request_size(data: bytes) -> int | None:
    """The full size of the request ``data`` starts with, once the header allows knowing it
    (None: more bytes needed)."""
    if len(data) < REQUEST_HEADER_SIZE:
        return None
    offset = REQUEST_HEADER_SIZE
    for _ in range(_number_at(data, NUMBER_SIZE)):
        if offset + NUMBER_SIZE > len(data):
            return None
        offset += NUMBER_SIZE + _number_at(data, offset)
    return offset


def encode_answer(exit_status: int, stdout: str, stderr: str) -> bytes:
    """The bytes of an answer."""
    out, err = _bytes(stdout), _bytes(stderr)
    return _number(exit_status, signed=True) + _number(len(out)) + _number(len(err)) + out + err


def split_answer(data: bytes) -> tuple[int, bytes, bytes]:
    """(exit status, stdout bytes, stderr bytes) of an answer; ValueError if truncated."""
    if len(data) < ANSWER_HEADER_SIZE:
        raise ValueError("truncated answer")
    out_size, err_size = _number_at(data, NUMBER_SIZE), _number_at(data, 2 * NUMBER_SIZE)
    if len(data) != ANSWER_HEADER_SIZE + out_size + err_size:
        raise ValueError("truncated answer")
    out_end = ANSWER_HEADER_SIZE + out_size
    return _number_at(data, 0, signed=True), data[ANSWER_HEADER_SIZE:out_end], data[out_end:]


def decode_answer(data: bytes) -> tuple[int, str, str]:
    """(exit status, stdout, stderr); ValueError if truncated."""
    exit_status, out, err = split_answer(data)
    return exit_status, _text(out), _text(err)
