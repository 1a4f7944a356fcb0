"""Runs tritonclient calls for test_inference_protocol.py, in a process of its own.

tritonclient's generated modules register Triton's ``inference.*`` protobuf symbols in
the default descriptor pool, and so does ``riskwire.protos.inference_pb2``: one process
cannot hold both, and other tests import riskwire's. So the pytest process starts this
script and talks to it over pipes, one JSON object per line each way:

    → {"op": "infer", "model": "fraud", "inputs": [{"name", "datatype", "shape", "values"}],
       "outputs": ["probability"], "request_id": "r1"}
    ← {"ok": true, "id": "r1", "model_name": ..., "outputs": {"probability": {...}}}
    ← {"ok": false, "status": "StatusCode.INVALID_ARGUMENT", "message": "..."}

Usage: ``python triton_driver.py HOST:PORT`` (not a test module: pytest does not collect it).
"""

from __future__ import annotations

import json
import queue
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

STREAM_TIMEOUT_S = 60.0
Call = dict[str, Any]


def _inputs(specs: list[Call]) -> list[triton.InferInput]:
    tensors = []
    for spec in specs:
        tensor = triton.InferInput(spec["name"], spec["shape"], spec["datatype"])
        dtype = object if spec["datatype"] == "BYTES" else triton_to_np_dtype(spec["datatype"])
        tensor.set_data_from_numpy(np.array(spec["values"], dtype=dtype).reshape(spec["shape"]))
        tensors.append(tensor)
    return tensors


def _outputs(names: list[str] | None) -> list[triton.InferRequestedOutput] | None:
    return [triton.InferRequestedOutput(name) for name in names] if names else None


def _result(result: triton.InferResult) -> Call:
    response = result.get_response()
    outputs = {}
    for tensor in response.outputs:
        array = result.as_numpy(tensor.name)
        values = [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
        outputs[tensor.name] = {
            "datatype": tensor.datatype,
            "shape": list(array.shape),
            "values": values,
        }
    return {
        "ok": True,
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }


def _error(exc: InferenceServerException) -> Call:
    return {"ok": False, "status": exc.status(), "message": exc.message()}


def _as_dict(message: Any) -> Call:
    return {
        "ok": True,
        "type": f"{type(message).__module__}.{type(message).__qualname__}",
        "message": json_format.MessageToDict(message, preserving_proto_field_name=True),
    }


def _infer(client: triton.InferenceServerClient, call: Call) -> Call:
    result = client.infer(
        call.get("model", "fraud"),
        _inputs(call["inputs"]),
        outputs=_outputs(call.get("outputs")),
        request_id=call.get("request_id", ""),
    )
    return _result(result)


def _stream(client: triton.InferenceServerClient, call: Call) -> Call:
    """Send every request on one stream; results (or errors) in arrival order."""
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        for request in call["requests"]:
            client.async_stream_infer(
                call.get("model", "fraud"),
                _inputs(request["inputs"]),
                request_id=request.get("request_id", ""),
            )
        pairs = [received.get(timeout=STREAM_TIMEOUT_S) for _ in call["requests"]]
    finally:
        client.stop_stream()
    return {
        "ok": True,
        "results": [_result(r) if e is None else _error(e) for r, e in pairs],
    }


OPS: dict[str, Callable[[triton.InferenceServerClient, Call], Call]] = {
    "live": lambda c, call: {"ok": True, "value": c.is_server_live()},
    "ready": lambda c, call: {"ok": True, "value": c.is_server_ready()},
    "model_ready": lambda c, call: {
        "ok": True,
        "value": c.is_model_ready(call["name"], call.get("version", "")),
    },
    "server_metadata": lambda c, call: _as_dict(c.get_server_metadata()),
    "model_metadata": lambda c, call: _as_dict(c.get_model_metadata(call["name"])),
    "model_config": lambda c, call: _as_dict(c.get_model_config(call["name"]).config),
    "infer": _infer,
    "stream": _stream,
}


def main(target: str) -> int:
    """Answer one JSON line per request line until stdin closes."""
    client = triton.InferenceServerClient(url=target)
    try:
        for line in sys.stdin:
            call = json.loads(line)
            try:
                result = OPS[call["op"]](client, call)
            except InferenceServerException as exc:
                result = _error(exc)
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails
                result = {"ok": False, "status": "driver-error", "message": repr(exc)}
            print(json.dumps(result), flush=True)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
