"""Reading one-row ModelInferRequests from their protobuf wire bytes, without messages.

The Open Inference Protocol's common online call is a ModelInferRequest of a handful
of one-element tensors. Parsing it into protobuf message objects and reading every
tensor's name, datatype, shape and contents back through them costs ~9 µs of Python
per call, more than scoring the row. :func:`read_one_row` walks the serialised bytes
once and writes where each value lies into an ``int64`` array; the caller slices the
strings and unpacks the numbers.

It reads only what it can read exactly as protobuf would and says "not mine" (a
status > 0) for everything else: a field given twice where the message has one,
groups, malformed varints, an unknown input name or datatype, a shape other than
``[1]`` / ``[1, 1]``, not exactly one element, typed integers outside their datatype,
contents of a second kind (protobuf would check those too). The caller then parses the
message with protobuf and takes its general path, which also produces the error a bad
request deserves. Parameters (perf_analyzer sends one) are checked as protobuf checks
them, their strings left to the caller's UTF-8 check, and not used: the general path
does not use them either. Unknown fields are skipped, as protobuf skips them.

Wire format: https://protobuf.dev/programming-guides/encoding/ (ModelInferRequest and
InferTensorContents as in ``protos/proto/riskwire/protos/inference.proto``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5  # protobuf wire types
MAX_FIELD = (1 << 29) - 1  # field numbers are 1 .. 2**29 - 1

# Statuses: 0 = read; anything else = let protobuf parse the message.
READ, MALFORMED, UNUSUAL, NOT_ONE_ROW, UNKNOWN_INPUT, OUT_OF_RANGE = 0, 1, 2, 3, 4, 5

# How a value is held (per input, slot KIND).
ELEMENT, FIXED, INTEGER = 0, 1, 2  # bytes at (offset, length) | little-endian number | value

# Result layout (int64 slots).
STATUS = 0
MODEL_NAME, MODEL_VERSION, REQUEST_ID = 1, 3, 5  # each (offset, length); length -1: absent
OUTPUT_COUNT = 7
OUTPUTS_AT = 8  # (offset, length) of each requested output name
MAX_OUTPUTS = 4
FIRST_DIMS = 16  # dimensions of the first input's shape (1 or 2)
TEXT_COUNT = 17  # unused strings (parameters, replaced names) to check as UTF-8
TEXTS_AT = 24  # (offset, length) of each
MAX_TEXTS = 12
INPUTS_AT = TEXTS_AT + 2 * MAX_TEXTS
ORDER, DATATYPE, KIND, OFFSET, LENGTH_SLOT, VALUE = range(6)  # per input
INPUT_SLOTS = 6
MAX_INPUTS = 16


def result_size(inputs: int) -> int:
    """Slots of the result array for ``inputs`` known input names."""
    return INPUTS_AT + INPUT_SLOTS * inputs + 2 * MAX_INPUTS


def string_table(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``strings`` as UTF-8 bytes back to back, and where each starts (plus the end)."""
    encoded = [s.encode() for s in strings]
    starts = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=starts[1:])
    return np.frombuffer(b"".join(encoded) or b"\0", np.uint8).copy(), starts


@njit(cache=True, nogil=True)
def _varint(buf, pos, end):  # noqa: ANN001, ANN202
    """(value as int64 two's complement, position after it); position -1: malformed."""
    result = 0
    shift = 0
    while pos < end and shift < 64:
        byte = np.int64(buf[pos])
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if shift == 63 and byte > 1:
                return 0, -1  # more than 64 bits
            return result, pos
        shift += 7
    return 0, -1


@njit(cache=True, nogil=True)
def _skip(buf, pos, end, wire):  # noqa: ANN001, ANN202
    """Position after a field's value of this wire type (-1: malformed or a group)."""
    if wire == VARINT:
        _, pos = _varint(buf, pos, end)
        return pos
    if wire == FIXED64:
        pos += 8
    elif wire == FIXED32:
        pos += 4
    elif wire == LENGTH:
        size, pos = _varint(buf, pos, end)
        if pos < 0 or size < 0 or size > end - pos:  # (no overflow on huge sizes)
            return -1
        pos += size
    else:
        return -1
    return pos if pos <= end else -1


@njit(cache=True, nogil=True)
def _length(buf, pos, end):  # noqa: ANN001, ANN202
    """(start, stop) of a length-delimited value at ``pos``; start -1: malformed."""
    size, pos = _varint(buf, pos, end)
    if pos < 0 or size < 0 or size > end - pos:  # (no overflow on huge sizes)
        return -1, -1
    return pos, pos + size


@njit(cache=True, nogil=True)
def _next_field(buf, pos, end, known):  # noqa: ANN001, ANN202
    """The next field numbered 1..``known`` from ``pos``, skipping any other as protobuf
    does: (status, field number, wire type, position after its key); field 0 when none
    is left."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field = key >> 3
        if pos < 0 or field < 1 or field > MAX_FIELD:
            return MALFORMED, 0, 0, -1
        wire = key & 7
        if field <= known:
            return READ, field, wire, pos
        pos = _skip(buf, pos, end, wire)
        if pos < 0:
            return MALFORMED, 0, 0, -1
    return READ, 0, 0, end


@njit(cache=True, nogil=True)
def _find(buf, start, stop, table, starts):  # noqa: ANN001, ANN202
    """Index of ``buf[start:stop]`` among the table's strings, or -1."""
    size = stop - start
    for index in range(len(starts) - 1):
        if starts[index + 1] - starts[index] != size:
            continue
        at = starts[index]
        same = True
        for j in range(size):
            if buf[start + j] != table[at + j]:
                same = False
                break
        if same:
            return index
    return -1


@njit(cache=True, nogil=True)
def _fixed(buf, pos, size):  # noqa: ANN001, ANN202
    """Little-endian unsigned integer of ``size`` bytes at ``pos``."""
    value = 0
    for j in range(size):
        value |= np.int64(buf[pos + j]) << (8 * j)
    return value


@njit(cache=True, nogil=True)
def _text(out, start, stop):  # noqa: ANN001, ANN202
    """Note a string for the caller's UTF-8 check (protobuf checks every string)."""
    count = out[TEXT_COUNT]
    if count >= MAX_TEXTS:
        return UNUSUAL
    out[TEXTS_AT + 2 * count] = start
    out[TEXTS_AT + 2 * count + 1] = stop - start
    out[TEXT_COUNT] = count + 1
    return READ


@njit(cache=True, nogil=True)
def _parameter(buf, at, to, out):  # noqa: ANN001, ANN202
    """Check an InferParameter (bool 1, int64 2, string 3, double 4, uint64 5)."""
    pos = at
    while True:
        status, field, wire, pos = _next_field(buf, pos, to, 5)
        if status != READ or field == 0:
            return status
        if wire != (LENGTH if field == 3 else (FIXED64 if field == 4 else VARINT)):
            return UNUSUAL
        if field == 3:
            start, stop = _length(buf, pos, to)
            if start < 0:
                return MALFORMED
            pos = stop
            if _text(out, start, stop) != READ:
                return UNUSUAL
        else:
            pos = _skip(buf, pos, to, wire)
            if pos < 0:
                return MALFORMED


@njit(cache=True, nogil=True)
def _parameters(buf, at, to, out):  # noqa: ANN001, ANN202
    """Check one entry of a ``map<string, InferParameter>`` as protobuf would (its
    strings are noted for the caller's UTF-8 check); the values are not used."""
    pos = at
    while True:
        status, field, wire, pos = _next_field(buf, pos, to, 2)
        if status != READ or field == 0:
            return status
        if wire != LENGTH:
            return UNUSUAL
        start, stop = _length(buf, pos, to)
        if start < 0:
            return MALFORMED
        pos = stop
        status = _text(out, start, stop) if field == 1 else _parameter(buf, start, stop, out)
        if status != READ:
            return status


@njit(cache=True, nogil=True)
def _output(buf, at, to, out):  # noqa: ANN001, ANN202
    """Read an InferRequestedOutputTensor: (status, name start, name stop); the last
    name counts, as in protobuf (-1, -1: none); its parameters are checked."""
    name_at = name_to = -1
    pos = at
    while True:
        status, field, wire, pos = _next_field(buf, pos, to, 2)
        if status != READ or field == 0:
            return status, name_at, name_to
        if wire != LENGTH:
            return UNUSUAL, -1, -1
        start, stop = _length(buf, pos, to)
        if start < 0:
            return MALFORMED, -1, -1
        pos = stop
        if field == 1:
            if name_at >= 0:  # protobuf checks the UTF-8 of the name replaced too
                status = _text(out, name_at, name_to)
                if status != READ:
                    return status, -1, -1
            name_at, name_to = start, stop
        else:
            status = _parameters(buf, start, stop, out)
            if status != READ:
                return status, -1, -1


@njit(cache=True, nogil=True)
def _tensor(buf, start, stop, out, count, names, name_starts, types, type_starts, accepted):  # noqa: ANN001, ANN202, PLR0913
    """Read one InferInputTensor; returns a status. The contents' range is kept in the
    input's OFFSET / LENGTH slots until raw contents are known to be absent."""
    name_at = name_to = type_at = type_to = contents_at = contents_to = -1
    dims = 0
    dim0 = dim1 = -1
    pos = start
    while True:
        status, field, wire, pos = _next_field(buf, pos, stop, 5)
        if status != READ:
            return status
        if field == 0:
            break
        if field == 1 or field == 2 or field == 5:
            if wire != LENGTH:
                return UNUSUAL
            at, to = _length(buf, pos, stop)
            if at < 0:
                return MALFORMED
            pos = to
            if field == 1:
                if name_at >= 0:
                    return UNUSUAL
                name_at, name_to = at, to
            elif field == 2:
                if type_at >= 0:
                    return UNUSUAL
                type_at, type_to = at, to
            else:
                if contents_at >= 0:
                    return UNUSUAL  # two contents fields merge: protobuf's to do
                contents_at, contents_to = at, to
        elif field == 3:  # shape: repeated int64, packed or not
            if wire == LENGTH:
                at, to = _length(buf, pos, stop)
                if at < 0:
                    return MALFORMED
                pos = to
            elif wire == VARINT:
                at, to = pos, stop  # one element
            else:
                return UNUSUAL
            while at < to:
                dim, at = _varint(buf, at, to)
                if at < 0:
                    return MALFORMED
                if dims == 0:
                    dim0 = dim
                elif dims == 1:
                    dim1 = dim
                dims += 1
                if wire == VARINT:
                    pos = at
                    break
        else:  # parameters
            if wire != LENGTH:
                return UNUSUAL
            at, to = _length(buf, pos, stop)
            if at < 0:
                return MALFORMED
            pos = to
            status = _parameters(buf, at, to, out)
            if status != READ:
                return status
    if name_at < 0:
        return UNKNOWN_INPUT
    index = _find(buf, name_at, name_to, names, name_starts)
    if index < 0:
        return UNKNOWN_INPUT
    base = INPUTS_AT + INPUT_SLOTS * index
    if out[base + ORDER] >= 0:
        return UNUSUAL  # given twice
    datatype = _find(buf, type_at, type_to, types, type_starts) if type_at >= 0 else -1
    if datatype < 0 or not accepted[index, datatype]:
        return UNUSUAL
    if not (dims == 1 and dim0 == 1 or dims == 2 and dim0 == 1 and dim1 == 1):
        return NOT_ONE_ROW
    if count == 0:
        out[FIRST_DIMS] = dims
    out[base + ORDER] = count
    out[base + DATATYPE] = datatype
    out[base + OFFSET] = contents_at
    out[base + LENGTH_SLOT] = contents_to - contents_at if contents_at >= 0 else 0
    return READ


@njit(cache=True, nogil=True)
def _contents(buf, at, to, field, width, out, base, low, high):  # noqa: ANN001, ANN202, PLR0913
    """Find the one element of repeated ``field`` in an InferTensorContents; ``width``
    is 0 for bytes, 4 / 8 for fixed, -1 / -2 / -3 for int32 / uint32 / int64 varints."""
    elements = 0
    pos = at
    while True:
        status, number, wire, pos = _next_field(buf, pos, to, 8)
        if status != READ:
            return status
        if number == 0:
            break
        if number != field:
            return UNUSUAL  # another kind of contents too (protobuf checks it)
        if width == 0:  # bytes: one element per occurrence
            if wire != LENGTH:
                return UNUSUAL
            start, stop = _length(buf, pos, to)
            if start < 0:
                return MALFORMED
            pos = stop
            elements += 1
            out[base + KIND] = ELEMENT
            out[base + OFFSET] = start
            out[base + LENGTH_SLOT] = stop - start
            continue
        if wire == LENGTH:  # packed
            start, stop = _length(buf, pos, to)
            if start < 0:
                return MALFORMED
            pos = stop
        elif wire == (VARINT if width < 0 else (FIXED32 if width == 4 else FIXED64)):
            start, stop = pos, to  # one unpacked element
        else:
            return UNUSUAL
        while start < stop:
            if width > 0:
                if start + width > stop:
                    return MALFORMED
                out[base + KIND] = FIXED
                out[base + OFFSET] = start
                out[base + LENGTH_SLOT] = width
                start += width
            else:
                value, start = _varint(buf, start, stop)
                if start < 0:
                    return MALFORMED
                if width != -3:  # 32-bit fields keep the low 32 bits, as protobuf does
                    value &= 0xFFFFFFFF
                    if width == -1 and value >= 0x80000000:
                        value -= 0x100000000
                if value < low or value > high:
                    return OUT_OF_RANGE
                out[base + KIND] = INTEGER
                out[base + VALUE] = value
            elements += 1
            if wire != LENGTH:
                pos = start
                break
    return READ if elements == 1 else NOT_ONE_ROW


def reader_spec(
    names: list[str],
    datatypes: list[str],
    accepted: np.ndarray,
    fields: list[int],
    widths: list[int],
    lows: list[int],
    highs: list[int],
) -> np.ndarray:
    """Everything :func:`read_one_row` needs to know about the model's inputs, in one
    array (one argument is cheaper to pass than eleven).

    ``names``: the known input names; ``datatypes``: datatype names;
    ``accepted[input, datatype]``: which datatypes each input takes; per datatype, the
    InferTensorContents ``fields`` number that carries it, its raw ``widths`` (bytes of
    raw content; 0 = BYTES) and the range ``lows``..``highs`` of typed integers.
    """
    name_bytes, name_starts = string_table(names)
    type_bytes, type_starts = string_table(datatypes)
    parts = [
        np.array([len(names), len(datatypes), len(name_bytes), len(type_bytes)], np.int64),
        name_starts, type_starts, np.asarray(accepted, np.int64).ravel(),
        np.asarray(fields, np.int64), np.asarray(widths, np.int64),
        np.asarray(lows, np.int64), np.asarray(highs, np.int64),
        name_bytes.astype(np.int64), type_bytes.astype(np.int64),
    ]  # fmt: skip
    return np.concatenate(parts)


@njit(cache=True, nogil=True)
def read_one_row(buf, out, spec):  # noqa: ANN001, ANN201
    """Read a one-row ModelInferRequest from ``buf`` into ``out`` (layout above), with
    the inputs described by ``spec`` (:func:`reader_spec`). Returns the status, also in
    ``out[STATUS]``."""
    inputs, kinds = spec[0], spec[1]
    at = 4
    name_starts = spec[at : at + inputs + 1]
    at += inputs + 1
    type_starts = spec[at : at + kinds + 1]
    at += kinds + 1
    accepted = spec[at : at + inputs * kinds].reshape((inputs, kinds))
    at += inputs * kinds
    fields = spec[at : at + kinds]
    widths = spec[at + kinds : at + 2 * kinds]
    lows = spec[at + 2 * kinds : at + 3 * kinds]
    highs = spec[at + 3 * kinds : at + 4 * kinds]
    at += 4 * kinds
    names = spec[at : at + spec[2]]
    types = spec[at + spec[2] : at + spec[2] + spec[3]]
    out[:] = 0
    for index in range(inputs):
        out[INPUTS_AT + INPUT_SLOTS * index + ORDER] = -1
    out[MODEL_NAME + 1] = out[MODEL_VERSION + 1] = out[REQUEST_ID + 1] = -1
    raw_at = INPUTS_AT + INPUT_SLOTS * inputs
    count = raws = outputs = 0
    end = len(buf)
    pos = 0
    status = READ
    while True:
        status, field, wire, pos = _next_field(buf, pos, end, 7)
        if status != READ or field == 0:
            break
        if wire != LENGTH:
            status = UNUSUAL  # a mistyped field: protobuf's to judge
            break
        at, to = _length(buf, pos, end)
        if at < 0:
            status = MALFORMED
            break
        pos = to
        if field == 4:  # parameters: checked, not used
            status = _parameters(buf, at, to, out)
            if status != READ:
                break
        elif field <= 3:  # model_name, model_version, id: the last one counts
            slot = MODEL_NAME if field == 1 else (MODEL_VERSION if field == 2 else REQUEST_ID)
            if out[slot + 1] >= 0:  # protobuf checks the UTF-8 of the one replaced too
                status = _text(out, out[slot], out[slot] + out[slot + 1])
                if status != READ:
                    break
            out[slot] = at
            out[slot + 1] = to - at
        elif field == 5:
            if count >= MAX_INPUTS:
                status = UNUSUAL
                break
            status = _tensor(
                buf, at, to, out, count, names, name_starts, types, type_starts, accepted
            )
            if status != READ:
                break
            count += 1
        elif field == 6:  # a requested output: its name (the last one counts)
            if outputs >= MAX_OUTPUTS:
                status = UNUSUAL
                break
            status, name_at, name_to = _output(buf, at, to, out)
            if status != READ:
                break
            out[OUTPUTS_AT + 2 * outputs] = max(name_at, 0)
            out[OUTPUTS_AT + 2 * outputs + 1] = name_to - name_at if name_at >= 0 else 0
            outputs += 1
        else:  # raw_input_contents
            if raws >= MAX_INPUTS:
                status = UNUSUAL
                break
            out[raw_at + 2 * raws] = at
            out[raw_at + 2 * raws + 1] = to - at
            raws += 1
    if status == READ and count == 0:
        status = NOT_ONE_ROW
    if status == READ and raws and raws != count:
        status = UNUSUAL  # the general path says what is wrong
    index = 0
    while status == READ and index < inputs:
        base = INPUTS_AT + INPUT_SLOTS * index
        index += 1
        order = out[base + ORDER]
        if order < 0:
            continue
        datatype = out[base + DATATYPE]
        width = widths[datatype]
        if raws:
            at = out[raw_at + 2 * order]
            size = out[raw_at + 2 * order + 1]
            if width == 0:  # BYTES: a 4-byte little-endian length, then the element
                if size < 4 or _fixed(buf, at, 4) != size - 4:
                    status = NOT_ONE_ROW
                    break
                out[base + KIND] = ELEMENT
                out[base + OFFSET] = at + 4
                out[base + LENGTH_SLOT] = size - 4
            else:
                if size != width:
                    status = NOT_ONE_ROW
                    break
                out[base + KIND] = FIXED
                out[base + OFFSET] = at
                out[base + LENGTH_SLOT] = size
        else:
            at = out[base + OFFSET]
            if at < 0:
                status = NOT_ONE_ROW  # no contents at all
                break
            typed = fields[datatype]
            status = _contents(
                buf, at, at + out[base + LENGTH_SLOT], typed,
                _typed_width(width, typed), out, base, lows[datatype], highs[datatype],
            )  # fmt: skip
    out[STATUS] = status
    out[OUTPUT_COUNT] = outputs
    return status


@njit(cache=True, nogil=True)
def _typed_width(raw_width, field):  # noqa: ANN001, ANN202
    """The :func:`_contents` width of a typed contents field."""
    if raw_width == 0:
        return 0
    if field == 6:  # fp32_contents
        return 4
    if field == 7:  # fp64_contents
        return 8
    if field == 3:  # int64_contents
        return -3
    if field == 4:  # uint_contents
        return -2
    return -1  # int_contents (int32)
