"""The protobuf wire primitives of kernels/wire.py against plain-Python references.

(The whole reader is checked against protobuf itself in tests/server/test_tensors.py.)
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from riskwire.kernels import wire


def encode_varint(value: int) -> bytes:
    """Reference: protobuf's base-128 varint of a 64-bit two's complement value."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def as_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


@given(value=st.integers(-(2**63), 2**64 - 1), tail=st.binary(max_size=4))
def test_varint_reads_what_the_reference_writes(value: int, tail: bytes) -> None:
    data = encode_varint(value) + tail
    read, position = wire._varint(data, 0, len(data))
    assert (read, position) == (as_int64(value), len(encode_varint(value)))


@given(data=st.binary(min_size=1, max_size=12).map(lambda b: bytes(x | 0x80 for x in b)))
def test_unterminated_varint_is_malformed(data: bytes) -> None:
    assert wire._varint(data, 0, len(data))[1] == -1


def test_varint_over_64_bits_is_malformed() -> None:
    data = b"\xff" * 9 + b"\x02"  # a tenth byte carrying more than the 64th bit
    assert wire._varint(data, 0, len(data))[1] == -1
    assert wire._varint(b"\xff" * 9 + b"\x01", 0, 10) == (-1, 10)


@given(strings=st.lists(st.text(max_size=8), min_size=1, max_size=6))
def test_string_table_finds_each_string(strings: list[str]) -> None:
    table, starts = wire.string_table(strings)
    for string in strings:
        data = string.encode()
        assert wire._find(data, 0, len(data), table, starts) == strings.index(string)
    absent = "".join(strings) + "\x00"
    assert wire._find(absent.encode(), 0, len(absent.encode()), table, starts) == -1


def test_empty_buffer_is_not_a_row() -> None:
    out = np.zeros(wire.result_size(1), np.int64)
    spec = wire.reader_spec(["x"], ["BYTES"], np.ones((1, 1), bool), [8], [0], [0], [0])
    assert wire.read_one_row(b"", out, spec) == wire.NOT_ONE_ROW


@given(size=st.integers(2**62, 2**63 - 1))
def test_huge_lengths_are_malformed_not_wrapped(size: int) -> None:
    """A length near 2**63 must not wrap the position round to a small number."""
    data = b"\x0a" + encode_varint(size) + b"xyz"
    assert wire._length(data, 1, len(data)) == (-1, -1)
    assert wire._skip(data, 1, len(data), wire.LENGTH) == -1
    out = np.zeros(wire.result_size(1), np.int64)
    spec = wire.reader_spec(["x"], ["BYTES"], np.ones((1, 1), bool), [8], [0], [0], [0])
    assert wire.read_one_row(data, out, spec) == wire.MALFORMED
