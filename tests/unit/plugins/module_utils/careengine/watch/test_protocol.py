"""The control socket's format: round trips, truncation, odd bytes."""

from __future__ import annotations

import pytest

from plugins.module_utils.careengine.watch import protocol


def test_request_round_trip_keeps_every_argument_byte_for_byte():
    argv = ["patch", "-p", "all", "/srv/store with space", "caf\udce9"]   # undecodable byte kept
    data = protocol.encode_request("/home/op", argv)
    assert protocol.request_size(data) == len(data)
    assert protocol.decode_request(data) == ("/home/op", argv)


def test_request_size_needs_the_whole_header_chain():
    data = protocol.encode_request("/", ["info"])
    assert all(protocol.request_size(data[:cut]) is None for cut in range(0, 16))


@pytest.mark.parametrize("data", [b"", b"XXXXXXXX", protocol.encode_request("/", ["info"])[:-1]])
def test_malformed_requests_are_refused(data):
    with pytest.raises(ValueError):
        protocol.decode_request(data)


def test_answer_round_trip_and_truncation():
    data = protocol.encode_answer(3, "out\n\0more", "err\n")
    assert protocol.decode_answer(data) == (3, "out\n\0more", "err\n")
    with pytest.raises(ValueError):
        protocol.decode_answer(data[:-1])
