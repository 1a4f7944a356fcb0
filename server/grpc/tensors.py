"""Open Inference Protocol tensors ↔ the dataplane's columns.

Inputs are the raw transaction fields as named tensors of shape ``[n]`` or ``[n, 1]``,
sent either as typed ``contents`` or as ``raw_input_contents`` (little-endian bytes;
BYTES elements each prefixed by a 4-byte little-endian length). Every malformed tensor
is an InvalidInputError naming the tensor and what was expected.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from riskwire.kernels.schema import NUM_FEATURES

from ..errors import InvalidInputError, clip


@dataclass(frozen=True)
class InputSpec:
    """One input tensor the model takes."""

    name: str
    datatype: str  # the canonical datatype advertised in metadata
    accepted: tuple[str, ...]  # datatypes accepted on the wire
    optional: bool = False


INPUTS = (
    InputSpec("transaction_id", "BYTES", ("BYTES",), optional=True),
    InputSpec("card_id", "BYTES", ("BYTES",)),
    InputSpec("merchant_id", "BYTES", ("BYTES",)),
    InputSpec("mcc", "INT32", ("INT32", "INT64", "INT16", "UINT16")),
    InputSpec("amount", "FP64", ("FP64", "FP32")),
    InputSpec("currency", "BYTES", ("BYTES",)),
    InputSpec("country", "BYTES", ("BYTES",)),
    InputSpec("card_country", "BYTES", ("BYTES",)),
    InputSpec("channel", "BYTES", ("BYTES",)),
    InputSpec("event_time_ms", "INT64", ("INT64",), optional=True),
)
INPUTS_BY_NAME = {spec.name: spec for spec in INPUTS}
OUTPUTS = (("probability", "FP64"), ("decision", "BYTES"))
OUTPUT_NAMES = tuple(name for name, _ in OUTPUTS)

_NUMPY_DTYPES = {
    "FP64": np.dtype("<f8"), "FP32": np.dtype("<f4"), "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"), "INT16": np.dtype("<i2"), "UINT16": np.dtype("<u2"),
}  # fmt: skip
# Which InferTensorContents field carries each datatype.
_CONTENTS_FIELD = {
    "FP64": "fp64_contents", "FP32": "fp32_contents", "INT64": "int64_contents",
    "INT32": "int_contents", "INT16": "int_contents", "UINT16": "uint_contents",
    "BYTES": "bytes_contents",
}  # fmt: skip
_LENGTH = struct.Struct("<I")


def _rows(name: str, shape) -> int:  # noqa: ANN001 - repeated int64 field
    dims = list(shape)
    if len(dims) == 1 and dims[0] >= 0:
        return dims[0]
    if len(dims) == 2 and dims[0] >= 0 and dims[1] == 1:
        return dims[0]
    raise InvalidInputError(
        f"input '{name}': shape {dims} is not accepted; expected [n] or [n, 1]", field=name
    )


def decode_bytes_elements(name: str, raw: bytes, count: int) -> list[bytes]:
    """Split length-prefixed BYTES tensor content into ``count`` elements."""
    elements, offset, size = [], 0, len(raw)
    for index in range(count):
        if offset + 4 > size:
            raise InvalidInputError(
                f"input '{name}': raw content ends before element {index} of {count} "
                "(BYTES elements need a 4-byte little-endian length prefix)",
                field=name,
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidInputError(
                f"input '{name}': element {index} declares {length} bytes but only "
                f"{size - offset} remain",
                field=name,
            )
        elements.append(raw[offset : offset + length])
        offset += length
    if offset != size:
        raise InvalidInputError(
            f"input '{name}': {size - offset} trailing bytes after {count} elements", field=name
        )
    return elements


def encode_bytes_elements(values) -> bytes:  # noqa: ANN001 - iterable of str
    """Length-prefixed BYTES tensor content."""
    parts = []
    for value in values:
        data = value.encode() if isinstance(value, str) else bytes(value)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _strings(name: str, elements: list[bytes]) -> list[str]:
    try:
        return [element.decode() for element in elements]
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"input '{name}': an element is not valid UTF-8 ({exc.reason})", field=name
        ) from None


FEATURES_INPUT = "features"


def decode_features(request, max_rows: int) -> np.ndarray | None:  # noqa: ANN001
    """The (n, NUM_FEATURES) matrix of a request whose only input is ``features``
    (FP64/FP32), or None for a request of raw transaction columns."""
    if len(request.inputs) != 1 or request.inputs[0].name != FEATURES_INPUT:
        return None
    tensor = request.inputs[0]
    dims = list(tensor.shape)
    if len(dims) != 2 or dims[0] < 0 or dims[1] != NUM_FEATURES:
        raise InvalidInputError(
            f"input 'features': shape {dims} is not accepted; expected [n, {NUM_FEATURES}]",
            field=FEATURES_INPUT,
        )
    if dims[0] > max_rows:
        raise InvalidInputError(
            f"input 'features': {dims[0]} rows exceed the limit of {max_rows} per request",
            field=FEATURES_INPUT,
        )
    spec = InputSpec(FEATURES_INPUT, "FP64", ("FP64", "FP32"))
    if tensor.datatype not in spec.accepted:
        raise InvalidInputError(
            f"input 'features': datatype {clip(tensor.datatype) or '(empty)'} is not accepted; "
            "expected FP64 or FP32",
            field=FEATURES_INPUT,
        )
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    values = _decode_tensor(tensor, spec, dims[0] * dims[1], raw)
    matrix = values.astype(np.float64, copy=False).reshape(dims[0], NUM_FEATURES)
    return np.ascontiguousarray(matrix)


def decode_inputs(request, max_rows: int) -> tuple[dict[str, object], int]:  # noqa: ANN001
    """Columns (lists / numpy arrays) and row count of a ModelInferRequest's inputs."""
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw_contents)} entries for {len(request.inputs)} "
            "inputs; send raw content for every input or for none"
        )
    columns: dict[str, object] = {}
    rows: int | None = None
    first_name = ""
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = INPUTS_BY_NAME.get(name)
        if spec is None:
            raise InvalidInputError(
                f"unexpected input '{name}'; the model takes {', '.join(s.name for s in INPUTS)}",
                field=name,
            )
        if name in columns:
            raise InvalidInputError(f"input '{name}' is given twice", field=name)
        if tensor.datatype not in spec.accepted:
            raise InvalidInputError(
                f"input '{name}': datatype {clip(tensor.datatype) or '(empty)'} is not accepted; "
                f"expected {' or '.join(spec.accepted)}",
                field=name,
            )
        count = _rows(name, tensor.shape)
        if count > max_rows:
            raise InvalidInputError(
                f"input '{name}': {count} rows exceed the limit of {max_rows} per request",
                field=name,
            )
        if rows is None:
            rows, first_name = count, name
        elif count != rows:
            raise InvalidInputError(
                f"input '{name}' has {count} rows but '{first_name}' has {rows}; "
                "all inputs need the same number of rows",
                field=name,
            )
        raw = raw_contents[index] if raw_contents else None
        columns[name] = _decode_tensor(tensor, spec, count, raw)
    missing = [s.name for s in INPUTS if not s.optional and s.name not in columns]
    if missing:
        raise InvalidInputError(f"missing input(s) {', '.join(missing)}", field=missing[0])
    rows = rows or 0
    if "event_time_ms" not in columns:
        columns["event_time_ms"] = np.zeros(rows, dtype=np.int64)
    return columns, rows


SCALAR_FORMATS = {
    name: struct.Struct(code) for name, code in (
        ("FP64", "<d"), ("FP32", "<f"), ("INT64", "<q"), ("INT32", "<i"), ("INT16", "<h"),
        ("UINT16", "<H"),
    )
}  # fmt: skip
REQUIRED_INPUTS = frozenset(spec.name for spec in INPUTS if not spec.optional)


def decode_single_row(request) -> dict[str, object] | None:  # noqa: ANN001
    """The values of a well-formed one-row request as Python scalars, read without numpy
    (the common online call), or None: then :func:`decode_inputs` decodes the request,
    or says what is wrong with it. Same values as the first row of ``decode_inputs``."""
    inputs = request.inputs
    raw_contents = list(request.raw_input_contents)
    if raw_contents and len(raw_contents) != len(inputs):
        return None
    values: dict[str, object] = {}
    for index, tensor in enumerate(inputs):
        name, datatype = tensor.name, tensor.datatype
        spec = INPUTS_BY_NAME.get(name)
        if spec is None or name in values or datatype not in spec.accepted:
            return None
        shape = tensor.shape
        dims = len(shape)
        if not (dims == 1 or dims == 2 and shape[1] == 1) or shape[0] != 1:
            return None
        if raw_contents:
            raw = raw_contents[index]
            if datatype == "BYTES":
                if len(raw) < 4 or _LENGTH.unpack_from(raw)[0] != len(raw) - 4:
                    return None
                value: object = raw[4:]
            else:
                scalar = SCALAR_FORMATS[datatype]
                if len(raw) != scalar.size:
                    return None
                value = scalar.unpack(raw)[0]
        else:
            content = getattr(tensor.contents, _CONTENTS_FIELD[datatype])
            if len(content) != 1:
                return None
            value = content[0]
            if datatype != "BYTES" and _NUMPY_DTYPES[datatype].kind != "f":
                info = np.iinfo(_NUMPY_DTYPES[datatype])
                if not info.min <= value <= info.max:
                    return None
        if datatype == "BYTES":
            try:
                value = value.decode()  # type: ignore[attr-defined]
            except UnicodeDecodeError:
                return None
        elif spec.datatype == "FP64":
            value = float(value)  # type: ignore[arg-type]
        else:
            value = int(value)  # type: ignore[call-overload]
        values[name] = value
    if not REQUIRED_INPUTS.issubset(values):
        return None
    values.setdefault("event_time_ms", 0)
    values.setdefault("transaction_id", "")
    return values


def _decode_tensor(tensor, spec: InputSpec, count: int, raw: bytes | None):  # noqa: ANN001, ANN202
    name, datatype = tensor.name, tensor.datatype
    if raw is not None:
        if datatype == "BYTES":
            return _strings(name, decode_bytes_elements(name, raw, count))
        dtype = _NUMPY_DTYPES[datatype]
        if len(raw) != count * dtype.itemsize:
            raise InvalidInputError(
                f"input '{name}': raw content has {len(raw)} bytes, expected "
                f"{count * dtype.itemsize} for {count} {datatype} elements",
                field=name,
            )
        values = np.frombuffer(raw, dtype=dtype)
    else:
        field = _CONTENTS_FIELD[datatype]
        content = getattr(tensor.contents, field)
        if len(content) != count:
            raise InvalidInputError(
                f"input '{name}': contents.{field} has {len(content)} elements, expected "
                f"{count} for its shape {list(tensor.shape)}",
                field=name,
            )
        if datatype == "BYTES":
            return _strings(name, list(content))
        dtype = _NUMPY_DTYPES[datatype]
        if dtype.kind == "f":
            values = np.asarray(content, dtype=dtype)
        else:  # typed int contents are 32/64-bit on the wire: check the declared range
            values = np.asarray(content, dtype=np.int64)
            info = np.iinfo(dtype)
            if len(values) and (values.min() < info.min or values.max() > info.max):
                raise InvalidInputError(
                    f"input '{name}': a value is outside the range of {datatype}", field=name
                )
    if spec.datatype == "FP64":
        return values.astype(np.float64, copy=False)
    return values.astype(np.int64, copy=False)
