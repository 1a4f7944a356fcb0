"""The one-row ModelInfer decoders against the general one (server/grpc/tensors.py), and
the wire reader and response writer of the fast path (server/grpc/infer_wire.py)
against protobuf's own parsing and serialisation."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from riskwire.protos import inference_pb2 as pb
from riskwire.server.errors import InvalidInputError
from riskwire.server.grpc.infer_wire import ResponseWriter, SingleRow, read_single_row
from riskwire.server.grpc.inference import infer_response
from riskwire.server.grpc.tensors import INPUTS, OUTPUT_NAMES, decode_inputs, decode_single_row

TEXT = st.text(min_size=0, max_size=12)
NUMERIC_FORMATS = {"FP64": "<d", "FP32": "<f", "INT64": "<q", "INT32": "<i", "INT16": "<h",
                   "UINT16": "<H"}  # fmt: skip
CONTENTS_FIELDS = {"FP64": "fp64_contents", "FP32": "fp32_contents", "INT64": "int64_contents",
                   "INT32": "int_contents", "INT16": "int_contents", "UINT16": "uint_contents",
                   "BYTES": "bytes_contents"}  # fmt: skip


@st.composite
def one_row_requests(draw: st.DrawFn, malformed: bool = True) -> pb.ModelInferRequest:
    """One-row requests in every accepted form; with ``malformed``, now and then a
    tensor of another shape or with truncated raw content."""

    def rarely() -> bool:
        return malformed and draw(st.integers(0, 30)) == 0

    raw = draw(st.booleans())
    request = pb.ModelInferRequest(model_name="fraud")
    specs = [s for s in INPUTS if not s.optional or draw(st.booleans())]
    for spec in draw(st.permutations(specs)):
        datatype = draw(st.sampled_from(spec.accepted))
        shape = draw(st.sampled_from([[2], [1, 2], []] if rarely() else [[1], [1, 1]]))
        if datatype == "BYTES":
            value: object = draw(TEXT).encode()
        elif datatype.startswith("FP"):
            value = draw(st.floats(-1e6, 1e6, width=32 if datatype == "FP32" else 64))
        else:
            value = draw(st.integers(-(2**15), 2**15 - 1) if datatype != "UINT16"
                         else st.integers(0, 2**16 - 1))  # fmt: skip
        request.inputs.add(name=spec.name, datatype=datatype, shape=shape)
        if raw:
            if datatype == "BYTES":
                content = struct.pack("<I", len(value)) + value  # type: ignore[arg-type]
            else:
                content = struct.pack(NUMERIC_FORMATS[datatype], value)
            if rarely():
                content = content[:-1]  # truncated
            request.raw_input_contents.append(content)
        else:
            getattr(request.inputs[-1].contents, CONTENTS_FIELDS[datatype]).append(value)
    return request


@settings(max_examples=300, deadline=None)
@given(request=one_row_requests())
def test_single_row_values_equal_the_general_decoders_first_row(request) -> None:
    single = decode_single_row(request)
    try:
        columns, rows = decode_inputs(request, max_rows=10)
    except InvalidInputError:
        assert single is None  # the general path explains what is wrong
        return
    if rows != 1:
        assert single is None
        return
    assert single is not None
    first = {
        name: value.item() if isinstance(value, np.generic) else value
        for name, value in ((n, c[0]) for n, c in columns.items())
    }
    first.setdefault("transaction_id", "")
    assert single == first
    assert {type(v) for v in single.values()} <= {str, int, float}


@settings(max_examples=100, deadline=None)
@given(request=one_row_requests(malformed=False))
def test_every_well_formed_one_row_request_takes_the_single_row_path(request) -> None:
    single = decode_single_row(request)
    assert single is not None
    names = {tensor.name for tensor in request.inputs}
    if "event_time_ms" not in names:
        assert single["event_time_ms"] == 0  # now, as in the general path
    if "transaction_id" not in names:
        assert single["transaction_id"] == ""


# ------------------------------------------------- the wire reader (server/grpc/infer_wire.py)
OUTPUT_CHOICES = st.lists(st.sampled_from(["probability", "decision"]), max_size=2, unique=True)


@st.composite
def serialized_requests(draw: st.DrawFn, malformed: bool = True) -> bytes:
    """One-row requests (see :func:`one_row_requests`) with names, id, requested outputs
    and parameters, serialised; with ``malformed``, also unknown outputs."""
    request = draw(one_row_requests(malformed=malformed))
    request.model_name = draw(st.sampled_from(["fraud", "", "Ω-model"]))
    request.model_version = draw(st.sampled_from(["", "1", "v2"]))
    request.id = draw(TEXT)
    for name in draw(OUTPUT_CHOICES if not malformed else st.lists(TEXT, max_size=5)):
        request.outputs.add(name=name)
    holders = [request, *request.inputs[:1], *request.outputs[:1]]
    for holder in draw(st.lists(st.sampled_from(holders), max_size=3)):  # checked, not used
        parameter = holder.parameters[draw(TEXT)]
        kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64"]))
        if kind == "bool":
            parameter.bool_param = draw(st.booleans())  # as perf_analyzer sends
        elif kind == "string":
            parameter.string_param = draw(TEXT)
        elif kind == "double":
            parameter.double_param = draw(st.floats())
        else:
            setattr(parameter, f"{kind}_param", draw(st.integers(0, 2**62)))
    return request.SerializeToString()


def _message_path(data: bytes) -> tuple | None:
    """What the message path reads from the same bytes (None: not a one-row request)."""
    request = pb.ModelInferRequest.FromString(data)
    values = decode_single_row(request)
    if values is None:
        return None
    names = [output.name for output in request.outputs]
    two_dims = len(request.inputs[0].shape) == 2
    return request.model_name, request.model_version, request.id, names, two_dims, values


def _fast_path(row: SingleRow) -> tuple:
    return (row.model_name, row.model_version, row.request_id, row.outputs, row.two_dims,
            row.values)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(data=serialized_requests())
def test_wire_reader_reads_what_the_message_path_reads(data: bytes) -> None:
    row = read_single_row(data)
    if row is None:  # the message path reads it (every well-formed one: see below)
        return
    expected = _message_path(data)
    assert expected is not None
    assert _fast_path(row) == expected
    assert {type(v) for v in row.values.values()} <= {str, int, float}


@settings(max_examples=100, deadline=None)
@given(data=serialized_requests(malformed=False))
def test_every_well_formed_request_takes_the_wire_path(data: bytes) -> None:
    assert read_single_row(data) is not None


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A well-formed request's bytes with a few bytes changed, inserted or cut."""
    data = bytearray(draw(serialized_requests(malformed=False)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        if action == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete" and data:
            del data[at]
        else:
            del data[at:]
    return bytes(data)


@settings(max_examples=1500, deadline=None)
@given(data=mutated_requests())
def test_wire_reader_reads_mutated_bytes_as_protobuf_does_or_falls_back(data: bytes) -> None:
    row = read_single_row(data)  # never raises
    if row is None:
        return
    try:
        expected = _message_path(data)
    except DecodeError:
        raise AssertionError("the wire reader read bytes protobuf rejects") from None
    assert expected is not None and _fast_path(row) == expected


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire_type)
    return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def _tensor(name: str, datatype: str, shape: bytes, contents: bytes) -> bytes:
    return _field(5, 2, _field(1, 2, name.encode()) + _field(2, 2, datatype.encode()) + shape
                  + _field(5, 2, contents))  # fmt: skip


def _text_tensor(name: str, value: str) -> bytes:
    return _tensor(name, "BYTES", _field(3, 2, _varint(1)), _field(8, 2, value.encode()))


REQUIRED_TEXT = {"card_id": "c-1", "merchant_id": "m-1", "currency": "EUR", "country": "DE",
                 "card_country": "DE", "channel": "pos"}  # fmt: skip


@pytest.mark.parametrize(
    ("mcc", "amount", "expected_mcc"),
    [
        # unpacked shape [1, 1], unpacked int32 and double elements
        (_tensor("mcc", "INT32", _field(3, 0, b"\x01") * 2, _field(2, 0, _varint(5411))),
         _tensor("amount", "FP64", _field(3, 0, b"\x01"), _field(7, 1, struct.pack("<d", 9.5))),
         5411),
        # a negative int32 (ten-byte varint) and a packed float
        (_tensor("mcc", "INT32", _field(3, 2, b"\x01"), _field(2, 0, _varint(-7))),
         _tensor("amount", "FP32", _field(3, 2, b"\x01"), _field(6, 2, struct.pack("<f", 9.5))),
         -7),
        # an int32 sent with more than 32 bits keeps the low 32, as protobuf does
        (_tensor("mcc", "INT32", _field(3, 2, b"\x01"), _field(2, 0, _varint(2**32 + 42))),
         _tensor("amount", "FP64", _field(3, 2, b"\x01"), _field(7, 2, struct.pack("<d", 9.5))),
         42),
    ],
)  # fmt: skip
def test_wire_reader_takes_every_encoding_protobuf_takes(
    mcc: bytes, amount: bytes, expected_mcc: int
) -> None:
    texts = b"".join(_text_tensor(name, value) for name, value in REQUIRED_TEXT.items())
    unknown = _field(99, 0, _varint(3))  # skipped, as protobuf skips it
    data = _field(1, 2, b"fraud") + texts + mcc + amount + unknown
    row = read_single_row(data)
    assert row is not None and _fast_path(row) == _message_path(data)
    assert row.values["mcc"] == expected_mcc and row.values["amount"] == 9.5


@pytest.mark.parametrize(
    "extra",
    [
        _field(0, 0, b"\x01"),  # field number 0
        _field(3, 3, b""),  # a group
        _field(5, 2, _field(1, 2, b"card_id") * 2),  # a tensor naming itself twice
        _text_tensor("card_id", "c-2"),  # an input given twice
        _text_tensor("features", "x"),  # not a raw input
    ],
)
def test_wire_reader_leaves_the_unusual_to_protobuf(extra: bytes) -> None:
    data = b"".join(_text_tensor(n, v) for n, v in REQUIRED_TEXT.items())
    data += _tensor("mcc", "INT32", _field(3, 2, b"\x01"), _field(2, 0, _varint(1)))
    data += _tensor("amount", "FP64", _field(3, 2, b"\x01"), _field(7, 2, bytes(8)))
    assert read_single_row(data) is not None
    assert read_single_row(data + extra) is None


@pytest.mark.parametrize(
    ("first", "last"),
    [
        (_field(2, 2, b"\x80"), _field(2, 2, b"1")),  # model_version
        (_field(3, 2, b"\xc3"), _field(3, 2, b"req-1")),  # id
        (_field(6, 2, _field(1, 2, b"\xff") + _field(1, 2, b"decision")), b""),  # an output name
    ],
)
def test_a_replaced_string_is_checked_as_protobuf_checks_it(first: bytes, last: bytes) -> None:
    """The last of a field given twice counts, but protobuf rejects the message when the
    one it replaced is not UTF-8 (found by the mutation test)."""
    data = _field(1, 2, b"fraud") + b"".join(_text_tensor(n, v) for n, v in REQUIRED_TEXT.items())
    data += _tensor("mcc", "INT32", _field(3, 2, b"\x01"), _field(2, 0, _varint(1)))
    data += _tensor("amount", "FP64", _field(3, 2, b"\x01"), _field(7, 2, bytes(8)))
    valid = first.replace(b"\x80", b"2").replace(b"\xc3", b"r").replace(b"\xff", b"p")
    row = read_single_row(data + valid + last)
    assert row is not None and _fast_path(row) == _message_path(data + valid + last)
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(data + first + last)
    assert read_single_row(data + first + last) is None


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["fraud", "Ω"]),
    version=st.sampled_from(["1", "12", ""]),
    request_id=st.text(min_size=1, max_size=200),
    outputs=OUTPUT_CHOICES,
    two_dims=st.booleans(),
    probability=st.floats(allow_nan=True, allow_infinity=True),
    decision=st.sampled_from(["approve", "review", "decline", ""]),
)
def test_response_bytes_equal_the_serialised_message(
    name: str, version: str, request_id: str, outputs: list[str], two_dims: bool,
    probability: float, decision: str,
) -> None:  # fmt: skip
    model = SimpleNamespace(name=name, version=version)
    written = ResponseWriter().write(
        name, version, request_id, outputs, two_dims, probability, decision
    )
    message = infer_response(
        model, request_id, outputs or OUTPUT_NAMES, [1, 1] if two_dims else [1],
        [probability], [decision], [()],
    )  # fmt: skip
    assert written == message.SerializeToString()


def test_perf_analyzers_request_takes_the_wire_path() -> None:
    """perf_analyzer's ModelInfer: a request parameter, [1, 1] shapes, raw contents,
    both outputs named (as captured from perf_analyzer 2.41)."""
    request = pb.ModelInferRequest(model_name="fraud")
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    values = {"amount": struct.pack("<d", 70.0), "card_country": b"DE", "card_id": b"card-8",
              "channel": b"atm", "country": b"DE", "currency": b"EUR",
              "event_time_ms": struct.pack("<q", 0), "mcc": struct.pack("<i", 5995),
              "merchant_id": b"m-00227", "transaction_id": b"tx-1"}  # fmt: skip
    for name, value in values.items():
        spec = next(s for s in INPUTS if s.name == name)
        request.inputs.add(name=name, datatype=spec.datatype, shape=[1, 1])
        if spec.datatype == "BYTES":
            value = struct.pack("<I", len(value)) + value
        request.raw_input_contents.append(value)
    request.outputs.add(name="decision")
    request.outputs.add(name="probability")
    data = request.SerializeToString()
    row = read_single_row(data)
    assert row is not None and _fast_path(row) == _message_path(data)
    assert row.outputs == ["decision", "probability"] and row.values["mcc"] == 5995
