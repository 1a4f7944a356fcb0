"""inference.GRPCInferenceService: the Open Inference Protocol v2 (+ Triton extensions)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from riskwire import __version__
from riskwire.protos import inference_pb2 as pb
from riskwire.protos import inference_pb2_grpc

from ..dataplane import DataPlane
from ..errors import InvalidInputError, ModelNotFoundError, clip
from ..registry import ModelRuntime
from ..request_log import CALL
from .dispatch import inline
from .infer_wire import ResponseWriter, SingleRow, read_single_row
from .scoring import RequestIds
from .status import caller, check_deadline, count_item, item_error, throttle, unary
from .tensors import (
    INPUTS,
    OUTPUT_NAMES,
    OUTPUTS,
    decode_features,
    decode_inputs,
    decode_single_row,
    encode_bytes_elements,
)

SERVICE = "inference.GRPCInferenceService"
PLATFORM = "riskwire_lightgbm"
EXTENSIONS = ("model_configuration",)
_TRITON_TYPES = {
    "BYTES": pb.TYPE_STRING, "FP64": pb.TYPE_FP64, "FP32": pb.TYPE_FP32,
    "INT64": pb.TYPE_INT64, "INT32": pb.TYPE_INT32,
}  # fmt: skip
_TensorMeta = pb.ModelMetadataResponse.TensorMetadata


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol v2 on top of :class:`DataPlane`."""

    def __init__(
        self, dataplane: DataPlane, is_ready: Callable[[], bool], ids: RequestIds | None = None
    ) -> None:
        self._dataplane = dataplane
        self._is_ready = is_ready
        self._ids = ids or RequestIds()
        self._writer = ResponseWriter()

    # ---------------------------------------------------------------- health & metadata
    @inline
    @unary
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @inline
    @unary
    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._is_ready())

    @inline
    @unary
    def ModelReady(self, request, context):
        try:
            self._dataplane.model(request.name, request.version)
        except ModelNotFoundError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._is_ready())

    @inline
    @unary
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="riskwire", version=__version__, extensions=EXTENSIONS
        )

    @inline
    @unary
    def ModelMetadata(self, request, context):
        model = self._named_model(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=self._dataplane.registry.versions(model.name),
            platform=PLATFORM,
            inputs=[_TensorMeta(name=s.name, datatype=s.datatype, shape=[-1, 1]) for s in INPUTS],
            outputs=[_TensorMeta(name=n, datatype=d, shape=[-1, 1]) for n, d in OUTPUTS],
        )

    @inline
    @unary
    def ModelConfig(self, request, context):
        model = self._named_model(request.name, request.version)
        config = pb.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend="riskwire",
            max_batch_size=min(self._dataplane.max_batch_rows, 2**31 - 1),
            input=[
                pb.ModelInput(
                    name=s.name, data_type=_TRITON_TYPES[s.datatype], dims=[1], optional=s.optional
                )
                for s in INPUTS
            ],
            output=[
                pb.ModelOutput(name=n, data_type=_TRITON_TYPES[d], dims=[1]) for n, d in OUTPUTS
            ],
        )
        return pb.ModelConfigResponse(config=config)

    # ---------------------------------------------------------------- inference
    @inline
    @unary
    def ModelInfer(self, request: bytes, context) -> bytes:
        """Bytes in, bytes out (registered with identity serialisers, see
        :func:`add_to_server`): a one-row request of raw inputs is read and answered
        without protobuf messages; any other is parsed and takes the general path."""
        row = read_single_row(request)
        if row is None:
            try:
                message = pb.ModelInferRequest.FromString(request)
            except DecodeError:
                raise InvalidInputError(
                    "the request is not a valid inference.ModelInferRequest message"
                ) from None
            return self._infer(message).SerializeToString()
        return self._infer_single(row)

    def ModelStreamInfer(self, request_iterator, context) -> Iterator[pb.ModelStreamInferResponse]:
        principal = caller(context, "ModelStreamInfer")
        for request in request_iterator:
            t0 = time.perf_counter()
            CALL.model = None
            try:
                check_deadline(context)
                throttle(principal, "ModelStreamInfer")
                response = self._infer(request)
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the stream
                code, message = item_error(exc)
                count_item("ModelStreamInfer", t0, None, code)
                yield pb.ModelStreamInferResponse(error_message=message)
                continue
            count_item("ModelStreamInfer", t0, response)
            yield pb.ModelStreamInferResponse(infer_response=response)

    def _named_model(self, name: str, version: str) -> ModelRuntime:
        if not name:
            raise InvalidInputError("model name is required", field="name")
        return self._dataplane.model(name, version)

    def _score_single(
        self, model: ModelRuntime, values: dict, request_id: str, route: bool
    ) -> tuple[list, list, list, ModelRuntime]:
        """One row given as scalars: exactly the columns of BATCH_COLUMNS and
        transaction_id, by name."""
        outcome = self._dataplane.score_one(
            model,
            **values,
            top_reasons=0,
            field_prefix="row 0: input ",
            request_id=request_id,
            route=route,
        )
        return [outcome.probability], [outcome.decision], [outcome.flags], outcome.model or model

    def _infer_single(self, row: SingleRow) -> bytes:
        """The fast path's answer, as response bytes."""
        model = self._named_model(row.model_name, row.model_version)
        wanted = _wanted_outputs(row.outputs)
        request_id = row.request_id or self._ids.next()
        probabilities, decisions, flags, model = self._score_single(
            model, row.values, request_id, not row.model_version
        )
        if flags[0]:  # findings go into the response's parameters: the message path
            response = infer_response(
                model, request_id, wanted, [1, 1] if row.two_dims else [1], probabilities,
                decisions, flags,
            )  # fmt: skip
            return response.SerializeToString()
        return self._writer.write(
            model.name, model.version, request_id, wanted, row.two_dims, probabilities[0],
            decisions[0],
        )  # fmt: skip

    def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        dataplane = self._dataplane
        model = self._named_model(request.model_name, request.model_version)
        wanted = _wanted_outputs([o.name for o in request.outputs])
        features = decode_features(request, dataplane.max_batch_rows)
        request_id = request.id or self._ids.next()
        if features is not None:  # ready-made feature rows: stateless scoring
            outcome = dataplane.score_features(model, features)
            probabilities, decisions, rows = outcome.probabilities, outcome.decisions, len(features)
            flags = outcome.flags
        elif (single := decode_single_row(request)) is not None:  # the common online call
            probabilities, decisions, flags, model = self._score_single(
                model, single, request_id, not request.model_version
            )
            rows = 1
        else:
            columns, rows = decode_inputs(request, dataplane.max_batch_rows)
            route = not request.model_version  # a canary may answer (by the first card)
            if rows == 1:  # the allocation-free single-row path
                values = {name: _first(column) for name, column in columns.items()}
                transaction_ids = columns.get("transaction_id")
                values["transaction_id"] = transaction_ids[0] if transaction_ids else ""
                probabilities, decisions, flags, model = self._score_single(
                    model, values, request_id, route
                )
            else:
                # All or nothing: a tensor request with a bad row must not touch card state.
                outcome = dataplane.score_batch(
                    model, columns, all_or_nothing=True, request_id=request_id, route=route
                )
                probabilities, decisions = outcome.probabilities, outcome.decisions
                flags, model = outcome.flags, outcome.model or model
        shape = [rows, 1] if len(request.inputs[0].shape) == 2 else [rows]
        return infer_response(model, request_id, wanted, shape, probabilities, decisions, flags)


def _wanted_outputs(names: Sequence[str]) -> Sequence[str]:
    """The requested outputs (none: all), each checked."""
    for name in names:
        if name not in OUTPUT_NAMES:
            raise InvalidInputError(
                f"unknown output '{clip(name)}'; the model produces {', '.join(OUTPUT_NAMES)}",
                field=name,
            )
    return names or OUTPUT_NAMES


def infer_response(
    model: ModelRuntime, request_id: str, wanted: Sequence[str], shape: list[int],
    probabilities: Sequence[float], decisions: Sequence[str], flags: Sequence[tuple[str, ...]],
) -> pb.ModelInferResponse:  # fmt: skip
    """A ModelInferResponse with raw output contents, in the requested order."""
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=model.version, id=request_id
    )
    flagged = {str(i): list(f) for i, f in enumerate(flags) if f}
    if flagged:  # validation findings scored anyway: {"row": ["range:amount", ...]}
        response.parameters["flags"].string_param = json.dumps(flagged)
    for name in wanted:
        if name == "probability":
            content = np.asarray(probabilities, dtype="<f8").tobytes()
            datatype = "FP64"
        else:
            content = encode_bytes_elements(decisions)
            datatype = "BYTES"
        response.outputs.add(name=name, datatype=datatype, shape=shape)  # no temporary
        response.raw_output_contents.append(content)
    return response


class _Registrar:
    """Stands in for a server to receive the generated code's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def add_to_server(servicer: InferenceServicer, server: grpc.Server) -> None:
    """Register the service as the generated code does, except that ModelInfer takes and
    returns serialised bytes (grpc's identity serialisers)."""
    registrar = _Registrar()
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, registrar)
    handlers = registrar.handlers
    if "ModelInfer" not in handlers:
        raise RuntimeError("the generated inference service code registers no ModelInfer")
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(servicer.ModelInfer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    register = getattr(server, "add_registered_method_handlers", None)
    if register is not None:
        register(SERVICE, handlers)


def _first(values) -> object:  # noqa: ANN001 - list or numpy array
    value = values[0]
    return value.item() if isinstance(value, np.generic) else value


def probabilities_from_response(response: pb.ModelInferResponse) -> np.ndarray:
    """The probability output of a response (for tests and the perf scripts)."""
    names = [o.name for o in response.outputs]
    return np.frombuffer(response.raw_output_contents[names.index("probability")], "<f8")
