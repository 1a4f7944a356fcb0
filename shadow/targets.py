"""Where shadow scores come from: a model in this process, or a remote OIP v2 endpoint.

Both score the *primary's* feature vectors, so the shadow sees exactly the per-card
state the primary saw and never updates that state a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from riskwire.kernels.schema import NUM_FEATURES


class RemoteShadowError(RuntimeError):
    """A remote shadow call failed (status code and details in the message)."""


class ShadowTarget(Protocol):
    """Scores feature rows for the shadow scorer."""

    name: str
    version: str
    review_threshold: float
    decline_threshold: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """Probabilities of an (n, NUM_FEATURES) float64 matrix."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def decision_codes(probabilities: np.ndarray, review: float, decline: float) -> np.ndarray:
    """0 approve / 1 review / 2 decline from thresholds (NaN → approve; callers mask it)."""
    return (probabilities >= review).astype(np.int64) + (probabilities >= decline)


@dataclass
class LocalTarget:
    """A model version loaded in this worker (its compiled forest)."""

    name: str
    version: str
    forest: Any  # riskwire.kernels.forest.Forest
    review_threshold: float
    decline_threshold: float
    package_dir: str = ""  # where it was loaded from (the scorer process loads it too)

    def score(self, features: np.ndarray) -> np.ndarray:
        """The forest's probabilities, on the calling thread (the kernel drops the GIL)."""
        return self.forest.predict(features, num_threads=1)

    def close(self) -> None:
        """Nothing to release."""


class RemoteTarget:
    """Any Open Inference Protocol v2 server (riskwire, Triton, MLServer, KServe).

    Sends one FP64 tensor ``[n, 23]`` of feature rows per batch and reads the output
    named ``probability`` (else the first output); a ``[n, 2]`` output is taken as class
    probabilities and its last column used.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        name: str,
        version: str,
        input_name: str,
        timeout_s: float,
        review_threshold: float,
        decline_threshold: float,
    ) -> None:
        import grpc

        from riskwire.protos import inference_pb2, inference_pb2_grpc

        self.name, self.version = name, version
        self.review_threshold, self.decline_threshold = review_threshold, decline_threshold
        self._pb = inference_pb2
        self._input_name = input_name
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(endpoint)
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._endpoint = endpoint
        self._rpc_error = grpc.RpcError

    def score(self, features: np.ndarray) -> np.ndarray:
        """Probabilities from one ModelInfer call (raises on any error or timeout)."""
        pb = self._pb
        rows = features.shape[0]
        request = pb.ModelInferRequest(
            model_name=self.name,
            model_version=self.version,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=self._input_name, datatype="FP64", shape=[rows, NUM_FEATURES]
                )
            ],
            raw_input_contents=[np.ascontiguousarray(features, dtype="<f8").tobytes()],
        )
        try:
            response = self._stub.ModelInfer(request, timeout=self._timeout_s)
        except self._rpc_error as exc:
            raise RemoteShadowError(
                f"{self._endpoint}: {exc.code().name}: {exc.details()}"
            ) from None
        return _probabilities(response, rows)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


_RAW_DTYPES = {"FP64": "<f8", "FP32": "<f4"}
_CONTENT_FIELDS = {"FP64": "fp64_contents", "FP32": "fp32_contents"}


def _probabilities(response: Any, rows: int) -> np.ndarray:
    outputs = list(response.outputs)
    if not outputs:
        raise ValueError("the shadow endpoint returned no outputs")
    names = [o.name for o in outputs]
    index = names.index("probability") if "probability" in names else 0
    tensor = outputs[index]
    if tensor.datatype not in _RAW_DTYPES:
        raise ValueError(f"shadow output '{tensor.name}' is {tensor.datatype}, not FP64/FP32")
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[index], _RAW_DTYPES[tensor.datatype])
    else:
        values = np.asarray(getattr(tensor.contents, _CONTENT_FIELDS[tensor.datatype]))
    values = values.astype(np.float64)
    if values.size == 2 * rows:
        values = values.reshape(rows, 2)[:, 1]
    if values.size != rows:
        raise ValueError(f"shadow output '{tensor.name}' has {values.size} values for {rows} rows")
    return values
