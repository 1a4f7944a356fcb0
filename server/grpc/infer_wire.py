"""ModelInfer's one-row fast path: request values straight from the wire bytes, the
response written as bytes.

ModelInfer is served with grpc's identity (de)serialisers. For a one-row request of the
model's raw inputs, :func:`read_single_row` takes the values out of the serialised
request with one Numba pass (``kernels/wire.py``) and :class:`ResponseWriter` writes the
response bytes around the probability and the decision: no protobuf message is built
either way. Every other request (batches, feature rows, anything unusual or wrong) is
parsed with protobuf and takes the general path, which gives the same answers and
errors as before; a test compares both paths on generated requests.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from riskwire.kernels import wire

from .tensors import INPUTS, OUTPUT_NAMES, REQUIRED_INPUTS, SCALAR_FORMATS

# Datatypes in the order of the kernel's tables: name, InferTensorContents field,
# raw width (0 = BYTES) and the range of typed integers.
_DATATYPES = (
    ("BYTES", 8, 0, 0, 0),
    ("FP64", 7, 8, 0, 0),
    ("FP32", 6, 4, 0, 0),
    ("INT64", 3, 8, -(2**63), 2**63 - 1),
    ("INT32", 2, 4, -(2**31), 2**31 - 1),
    ("INT16", 2, 2, -(2**15), 2**15 - 1),
    ("UINT16", 4, 2, 0, 2**16 - 1),
)
_DATATYPE_NAMES = tuple(d[0] for d in _DATATYPES)
_SPEC = wire.reader_spec(
    [spec.name for spec in INPUTS],
    list(_DATATYPE_NAMES),
    np.array([[name in spec.accepted for name in _DATATYPE_NAMES] for spec in INPUTS]),
    *(list(column) for column in list(zip(*_DATATYPES, strict=True))[1:]),
)
# Little-endian unpackers by the kernel's datatype index (None for BYTES), and per input
# in INPUTS order: (name, float result?).
_UNPACKERS = tuple(SCALAR_FORMATS.get(name) for name in _DATATYPE_NAMES)
_READERS = tuple((spec.name, spec.datatype == "FP64") for spec in INPUTS)


class _Result(threading.local):
    """The kernel's result array of this thread, and views of its parts."""

    def __init__(self) -> None:
        self.out = np.zeros(wire.result_size(len(INPUTS)), np.int64)
        self.header = self.out[: wire.INPUTS_AT]
        inputs_end = wire.INPUTS_AT + wire.INPUT_SLOTS * len(INPUTS)
        self.inputs = self.out[wire.INPUTS_AT : inputs_end].reshape(len(INPUTS), wire.INPUT_SLOTS)


_result = _Result()


@dataclass(slots=True)
class SingleRow:
    """A one-row ModelInferRequest, read from its bytes."""

    model_name: str
    model_version: str
    request_id: str
    outputs: list[str]  # the requested output names, in order (empty: all)
    two_dims: bool  # the first input's shape was [1, 1] (answers get shape [1, 1])
    values: dict[str, object]  # every input, as decode_single_row gives them


def read_single_row(raw: bytes) -> SingleRow | None:
    """The request's row when it is a well-formed one-row request of the raw inputs
    (the same values :func:`tensors.decode_single_row` reads from the parsed message),
    or None: then parse it with protobuf."""
    result = _result
    if wire.read_one_row(raw, result.out, _SPEC):
        return None
    slots = result.header.tolist()
    values: dict[str, object] = {}
    try:
        for (name, is_float), (order, datatype, kind, at, size, value) in zip(
            _READERS, result.inputs.tolist(), strict=True
        ):
            if order < 0:
                continue
            if kind == wire.ELEMENT:
                values[name] = raw[at : at + size].decode()
                continue
            if kind == wire.FIXED:
                value = _UNPACKERS[datatype].unpack_from(raw, at)[0]
            values[name] = float(value) if is_float else int(value)
        model_name = _text(raw, slots, wire.MODEL_NAME)
        model_version = _text(raw, slots, wire.MODEL_VERSION)
        request_id = _text(raw, slots, wire.REQUEST_ID)
        for index in range(slots[wire.TEXT_COUNT]):  # unused strings protobuf checks too
            at, size = slots[wire.TEXTS_AT + 2 * index : wire.TEXTS_AT + 2 * index + 2]
            raw[at : at + size].decode()
        outputs = []
        for index in range(slots[wire.OUTPUT_COUNT]):
            at, size = slots[wire.OUTPUTS_AT + 2 * index : wire.OUTPUTS_AT + 2 * index + 2]
            outputs.append(raw[at : at + size].decode())
    except UnicodeDecodeError:
        return None
    if not REQUIRED_INPUTS.issubset(values):
        return None
    values.setdefault("event_time_ms", 0)
    values.setdefault("transaction_id", "")
    return SingleRow(
        model_name, model_version, request_id, outputs, slots[wire.FIRST_DIMS] == 2, values
    )


def _text(raw: bytes, slots: list[int], slot: int) -> str:
    size = slots[slot + 1]
    return raw[slots[slot] : slots[slot] + size].decode() if size > 0 else ""


def warmup() -> None:
    """Compile (or load) the kernel before the worker serves."""
    read_single_row(b"")


# ------------------------------------------------------------------ the response
def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(field: int, data: bytes) -> bytes:
    return _key(field, wire.LENGTH) + _varint(len(data)) + data


_PROBABILITY = struct.Struct("<d")
_DECISION_LENGTH = struct.Struct("<I")
_RAW_PROBABILITY = _key(6, wire.LENGTH) + _varint(8)  # raw_output_contents: 8 bytes
_ID_KEY = _key(3, wire.LENGTH)
_SMALL = tuple(bytes([n]) for n in range(0x80))  # one-byte varints
_OUTPUT_TYPES = {"probability": "FP64", "decision": "BYTES"}


class ResponseWriter:
    """ModelInferResponse bytes of one-row answers: the parts that depend only on the
    model version, the requested outputs and the shape, and each decision's output
    content, are encoded once."""

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str], bytes] = {}
        self._outputs: dict[tuple[tuple[str, ...], bool], bytes] = {}
        self._decisions: dict[str, bytes] = {}

    def write(
        self,
        model_name: str,
        model_version: str,
        request_id: str,
        outputs: Sequence[str],
        two_dims: bool,
        probability: float,
        decision: str,
    ) -> bytes:
        """The serialised response (outputs: requested names, known to be valid)."""
        head = self._heads.get((model_name, model_version))
        if head is None:
            head = self._heads[model_name, model_version] = _head(model_name, model_version)
        key = (tuple(outputs) or OUTPUT_NAMES, two_dims)
        tensors = self._outputs.get(key)
        if tensors is None:
            tensors = self._outputs[key] = _output_tensors(*key)
        encoded_id = request_id.encode()
        size = len(encoded_id)
        parts = [head, _ID_KEY, _SMALL[size] if size < 0x80 else _varint(size), encoded_id, tensors]
        for name in key[0]:
            if name == "probability":
                parts += (_RAW_PROBABILITY, _PROBABILITY.pack(probability))
            else:
                content = self._decisions.get(decision)
                if content is None:
                    content = self._decisions[decision] = _decision_content(decision)
                parts.append(content)
        return b"".join(parts)


def _decision_content(decision: str) -> bytes:
    """The raw_output_contents entry of a decision: a 4-byte length, then the bytes."""
    encoded = decision.encode()
    return _delimited(6, _DECISION_LENGTH.pack(len(encoded)) + encoded)


def _head(model_name: str, model_version: str) -> bytes:
    head = _delimited(1, model_name.encode()) if model_name else b""
    return head + (_delimited(2, model_version.encode()) if model_version else b"")


def _output_tensors(names: tuple[str, ...], two_dims: bool) -> bytes:
    shape = _varint(1) * (2 if two_dims else 1)  # packed int64 shape: [1] or [1, 1]
    tensors = b""
    for name in names:
        tensor = _delimited(1, name.encode()) + _delimited(2, _OUTPUT_TYPES[name].encode())
        tensors += _delimited(5, tensor + _delimited(3, shape))
    return tensors
