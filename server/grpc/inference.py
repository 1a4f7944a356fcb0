"""inference.GRPCInferenceService: the Open Inference Protocol v2 (+ Triton extensions)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import numpy as np

from riskwire import __version__
from riskwire.protos import inference_pb2 as pb
from riskwire.protos import inference_pb2_grpc

from ..dataplane import BATCH_COLUMNS, DataPlane
from ..errors import InvalidInputError, ModelNotFoundError, clip
from ..registry import ModelRuntime
from ..request_log import CALL
from .dispatch import inline
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
    def ModelInfer(self, request, context):
        return self._infer(request)

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
        """One row given as scalars (every column of BATCH_COLUMNS and transaction_id)."""
        outcome = self._dataplane.score_one(
            model,
            **{name: values[name] for name in BATCH_COLUMNS},
            top_reasons=0,
            field_prefix="row 0: input ",
            request_id=request_id,
            transaction_id=values["transaction_id"],
            route=route,
        )
        return [outcome.probability], [outcome.decision], [outcome.flags], outcome.model or model

    def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        dataplane = self._dataplane
        model = self._named_model(request.model_name, request.model_version)
        wanted = [o.name for o in request.outputs] or list(OUTPUT_NAMES)
        for name in wanted:
            if name not in OUTPUT_NAMES:
                raise InvalidInputError(
                    f"unknown output '{clip(name)}'; the model produces {', '.join(OUTPUT_NAMES)}",
                    field=name,
                )
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


def _first(values) -> object:  # noqa: ANN001 - list or numpy array
    value = values[0]
    return value.item() if isinstance(value, np.generic) else value


def probabilities_from_response(response: pb.ModelInferResponse) -> np.ndarray:
    """The probability output of a response (for tests and the perf scripts)."""
    names = [o.name for o in response.outputs]
    return np.frombuffer(response.raw_output_contents[names.index("probability")], "<f8")
