"""The one-row ModelInfer decoder against the general one (server/grpc/tensors.py)."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from riskwire.protos import inference_pb2 as pb
from riskwire.server.errors import InvalidInputError
from riskwire.server.grpc.tensors import INPUTS, decode_inputs, decode_single_row

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
