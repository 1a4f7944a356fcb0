"""Open Inference Protocol v2 (inference.GRPCInferenceService): tritonclient and raw calls.

tritonclient (the real third-party client) runs in a helper process, triton_driver.py:
its generated modules and ``riskwire.protos.inference_pb2`` declare the same
``inference.*`` symbols and one process's default descriptor pool cannot hold both.
Hand-built requests use riskwire's message classes from a private pool (``oip_pb``).
"""

from __future__ import annotations

import json
import select
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import pytest

from riskwire.kernels.encoding import encode_columns
from riskwire.kernels.features import compute_features_offline
from riskwire.protos import scoring_pb2, scoring_pb2_grpc

pytestmark = pytest.mark.timeout(300)

MODEL = "fraud"
T0 = 1_767_225_600_000 + 15 * 3_600_000
DRIVER = Path(__file__).with_name("triton_driver.py")
DRIVER_REPLY_TIMEOUT_S = 90.0
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
STRING_INPUTS = ("card_id", "merchant_id", "currency", "country", "card_country", "channel")
REQUIRED_INPUTS = (
    "card_id", "merchant_id", "mcc", "amount", "currency", "country", "card_country", "channel",
)  # fmt: skip
INVALID = "StatusCode.INVALID_ARGUMENT"
NOT_FOUND = "StatusCode.NOT_FOUND"
Reply = dict[str, Any]


def rows(n: int) -> dict[str, list]:
    """``n`` varied raw transactions on fresh cards, as columns."""
    channels = ("pos", "ecommerce", "atm", "moto", "contactless")
    return {
        "card_id": [f"card-{uuid.uuid4().hex}" for _ in range(n)],
        "merchant_id": [f"m-{i % 4:05d}" for i in range(n)],
        "mcc": [(5411, 5732, 4829, 5812, 6011)[i % 5] for i in range(n)],
        "amount": [2.5 + 61.75 * (i % 7) for i in range(n)],
        "currency": [("EUR", "USD", "RUB")[i % 3] for i in range(n)],
        "country": [("DE", "US", "RU", "FR")[i % 4] for i in range(n)],
        "card_country": ["DE"] * n,
        "channel": [channels[i % 5] for i in range(n)],
        "event_time_ms": [T0 + i * 45_000 for i in range(n)],
    }


def fresh_copy(columns: dict[str, list]) -> dict[str, list]:
    """The same rows on other fresh cards (so both copies start from empty state)."""
    n = len(columns["card_id"])
    return {**columns, "card_id": [f"card-{uuid.uuid4().hex}" for _ in range(n)]}


def tensor(name: str, datatype: str, shape: list[int], values: list) -> Reply:
    """One input spec for the driver."""
    return {"name": name, "datatype": datatype, "shape": shape, "values": values}


def input_specs(columns: dict[str, list], *, two_d: bool = False, with_time: bool = True) -> list:
    """Driver inputs: BYTES strings, FP64 amount, INT32 mcc, optional INT64 event_time_ms."""
    n = len(columns["card_id"])
    shape = [n, 1] if two_d else [n]
    specs = [tensor(name, "BYTES", shape, columns[name]) for name in STRING_INPUTS]
    specs.append(tensor("amount", "FP64", shape, columns["amount"]))
    specs.append(tensor("mcc", "INT32", shape, columns["mcc"]))
    if with_time:
        specs.append(tensor("event_time_ms", "INT64", shape, columns["event_time_ms"]))
    return specs


def without(specs: list[Reply], name: str) -> list[Reply]:
    """The specs minus the named input."""
    return [s for s in specs if s["name"] != name]


def score_batch(target: str, columns: dict[str, list]) -> scoring_pb2.ScoreBatchResponse:
    """The same rows through riskwire.v1 ScoreBatch."""
    n = len(columns["card_id"])
    transactions = [
        scoring_pb2.Transaction(**{name: values[i] for name, values in columns.items()})
        for i in range(n)
    ]
    with grpc.insecure_channel(target) as channel:
        return scoring_pb2_grpc.ScoringStub(channel).ScoreBatch(
            scoring_pb2.ScoreBatchRequest(transactions=transactions), timeout=10
        )


def offline_probabilities(forest, columns: dict[str, list]) -> np.ndarray:
    """One offline feature pass over the rows (in order), then the package forest."""
    raw = {name: values for name, values in columns.items() if name != "event_time_ms"}
    features, _ = compute_features_offline(
        encode_columns({**raw, "event_time": columns["event_time_ms"]})
    )
    return forest.predict(features)


def assert_invalid(reply: Reply, *names: str) -> None:
    """The call failed with INVALID_ARGUMENT and its message names each of ``names``."""
    assert not reply["ok"] and reply["status"] == INVALID, reply
    for name in names:
        assert name in reply["message"], reply["message"]


# ------------------------------------------------------------------------ fixtures


class TritonDriver:
    """The tritonclient helper process: ``driver(op, **fields)`` → its JSON reply."""

    def __init__(self, target: str, stderr: IO[str]) -> None:
        self._stderr = stderr
        self.process = subprocess.Popen(
            [sys.executable, str(DRIVER), target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )

    def __call__(self, op: str, **fields: Any) -> Reply:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], DRIVER_REPLY_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self._stderr.seek(0)
            pytest.fail(f"triton driver gave no reply to {op}:\n{self._stderr.read()[-4000:]}")
        reply = json.loads(line)
        assert reply.get("status") != "driver-error", reply
        return reply

    def close(self) -> None:
        """Close its stdin and wait for it to exit."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def triton(server) -> Iterator[TritonDriver]:
    """tritonclient's gRPC client on the shared server (in the helper process)."""
    with tempfile.TemporaryFile("w+") as stderr:
        driver = TritonDriver(server.target, stderr)
        yield driver
        driver.close()


@pytest.fixture(scope="module")
def model_infer(server, oip_pb) -> Iterator[Callable[..., Any]]:
    """``model_infer(request)``: a raw ModelInfer call with riskwire's own messages."""
    with grpc.insecure_channel(server.target) as channel:
        yield channel.unary_unary(
            MODEL_INFER,
            request_serializer=oip_pb.ModelInferRequest.SerializeToString,
            response_deserializer=oip_pb.ModelInferResponse.FromString,
        )


def raw_request(oip_pb, columns: dict[str, list]) -> Any:
    """A ModelInferRequest built by hand, with raw_input_contents for every input."""
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    n = len(columns["card_id"])
    for name in STRING_INPUTS:
        request.inputs.add(name=name, datatype="BYTES", shape=[n])
        request.raw_input_contents.append(
            b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in columns[name])
        )
    request.inputs.add(name="amount", datatype="FP64", shape=[n])
    request.raw_input_contents.append(np.asarray(columns["amount"], "<f8").tobytes())
    request.inputs.add(name="mcc", datatype="INT32", shape=[n])
    request.raw_input_contents.append(np.asarray(columns["mcc"], "<i4").tobytes())
    request.inputs.add(name="event_time_ms", datatype="INT64", shape=[n])
    request.raw_input_contents.append(np.asarray(columns["event_time_ms"], "<i8").tobytes())
    return request


def raw_invalid(call: Callable[[], Any], *names: str) -> str:
    """Run a raw call; it must fail with INVALID_ARGUMENT naming every one of ``names``."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()[:300]
    for name in names:
        assert name in info.value.details(), info.value.details()
    return info.value.details()


# ------------------------------------------------------------------------ health & metadata


def test_server_live_and_ready(triton: TritonDriver) -> None:
    """ServerLive / ServerReady are true once the server reports SERVING."""
    assert triton("live")["value"] is True
    assert triton("ready")["value"] is True


def test_model_ready(triton: TritonDriver) -> None:
    """ModelReady: true for the served model (and its version), false otherwise."""
    assert triton("model_ready", name=MODEL)["value"] is True
    assert triton("model_ready", name=MODEL, version="1")["value"] is True
    assert triton("model_ready", name="no-such-model")["value"] is False
    assert triton("model_ready", name=MODEL, version="999")["value"] is False


def test_server_metadata(triton: TritonDriver) -> None:
    """ServerMetadata names riskwire and the model_configuration extension."""
    metadata = triton("server_metadata")["message"]
    assert metadata["name"] == "riskwire" and metadata["version"]
    assert "model_configuration" in metadata["extensions"]


def test_model_metadata(triton: TritonDriver) -> None:
    """ModelMetadata lists inputs/outputs with names, datatypes and [-1, 1] shapes."""
    metadata = triton("model_metadata", name=MODEL)["message"]
    assert metadata["name"] == MODEL and "1" in metadata["versions"]
    inputs = {t["name"]: t["datatype"] for t in metadata["inputs"]}
    assert {name: inputs[name] for name in STRING_INPUTS} == dict.fromkeys(STRING_INPUTS, "BYTES")
    assert inputs["amount"] == "FP64" and inputs["mcc"] == "INT32"
    assert inputs["event_time_ms"] == "INT64"
    assert {t["name"]: t["datatype"] for t in metadata["outputs"]} == {
        "probability": "FP64",
        "decision": "BYTES",
    }
    assert all(t["shape"] == ["-1", "1"] for t in (*metadata["inputs"], *metadata["outputs"]))


def test_model_metadata_unknown_model_is_not_found(triton: TritonDriver) -> None:
    """Metadata / config of an unknown model → NOT_FOUND."""
    for op in ("model_metadata", "model_config"):
        reply = triton(op, name="no-such-model")
        assert not reply["ok"] and reply["status"] == NOT_FOUND, reply


def test_model_config_is_a_triton_model_config(triton: TritonDriver) -> None:
    """ModelConfig decodes as Triton's own ModelConfig with the same inputs and outputs."""
    reply = triton("model_config", name=MODEL)
    assert reply["type"].endswith("model_config_pb2.ModelConfig"), reply["type"]
    config = reply["message"]
    assert config["name"] == MODEL and config["max_batch_size"] > 0
    inputs = {i["name"]: i for i in config["input"]}
    assert set(REQUIRED_INPUTS) <= set(inputs)
    assert inputs["amount"]["data_type"] == "TYPE_FP64"
    assert inputs["mcc"]["data_type"] == "TYPE_INT32"
    assert inputs["card_id"]["data_type"] == "TYPE_STRING"
    assert inputs["event_time_ms"].get("optional") is True
    assert not inputs["card_id"].get("optional", False)
    assert all(i["dims"] == ["1"] for i in config["input"])
    assert {o["name"]: o["data_type"] for o in config["output"]} == {
        "probability": "TYPE_FP64",
        "decision": "TYPE_STRING",
    }


# ------------------------------------------------------------------------ inference


@pytest.mark.parametrize(("n", "two_d"), [(1, False), (1, True), (7, False), (7, True)])
def test_infer_equals_score_batch(triton: TritonDriver, server, n: int, two_d: bool) -> None:
    """ModelInfer on fresh cards == riskwire.v1 ScoreBatch on other fresh cards."""
    columns = rows(n)
    reply = triton("infer", inputs=input_specs(columns, two_d=two_d), request_id=f"req-{n}")
    assert reply["ok"], reply
    assert (reply["model_name"], reply["model_version"], reply["id"]) == (MODEL, "1", f"req-{n}")
    probability, decision = reply["outputs"]["probability"], reply["outputs"]["decision"]
    assert probability["datatype"] == "FP64" and decision["datatype"] == "BYTES"
    assert probability["shape"] == decision["shape"] == ([n, 1] if two_d else [n])
    batch = score_batch(server.target, fresh_copy(columns))
    assert probability["values"] == [r.probability for r in batch.results]
    names = {1: "approve", 2: "review", 3: "decline"}
    assert decision["values"] == [names[r.decision] for r in batch.results]


def test_infer_without_event_time_uses_now(triton: TritonDriver) -> None:
    """event_time_ms is optional (absent = the server's clock)."""
    reply = triton("infer", inputs=input_specs(rows(3), with_time=False))
    assert reply["ok"], reply
    values = reply["outputs"]["probability"]["values"]
    assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values)


def test_infer_requested_output_subset(triton: TritonDriver) -> None:
    """Only the requested outputs come back."""
    reply = triton("infer", inputs=input_specs(rows(2)), outputs=["decision"])
    assert set(reply["outputs"]) == {"decision"}
    assert set(reply["outputs"]["decision"]["values"]) <= {"approve", "review", "decline"}
    reply = triton("infer", inputs=input_specs(rows(2)), outputs=["probability"])
    assert set(reply["outputs"]) == {"probability"}
    assert reply["outputs"]["probability"]["shape"] == [2]


def test_infer_unknown_requested_output(triton: TritonDriver) -> None:
    """An unknown requested output → INVALID_ARGUMENT naming it."""
    assert_invalid(triton("infer", inputs=input_specs(rows(1)), outputs=["score"]), "score")


def test_stream_infer(triton: TritonDriver, server) -> None:
    """ModelStreamInfer (start_stream/async_stream_infer): results in order; a bad request
    gets an error and the stream goes on."""
    batches = [rows(2), rows(3), rows(1)]
    bad = [*input_specs(rows(1)), tensor("bogus", "FP64", [1], [0.0])]
    requests = [{"inputs": input_specs(b), "request_id": f"s{i}"} for i, b in enumerate(batches)]
    requests += [
        {"inputs": bad, "request_id": "bad"},
        {"inputs": input_specs(rows(2)), "request_id": "after"},
    ]
    results = triton("stream", requests=requests)["results"]
    assert len(results) == 5
    for i, columns in enumerate(batches):
        assert results[i]["ok"] and results[i]["id"] == f"s{i}", results[i]
        expected = score_batch(server.target, fresh_copy(columns))
        assert results[i]["outputs"]["probability"]["values"] == [
            r.probability for r in expected.results
        ]
    assert not results[3]["ok"] and "bogus" in results[3]["message"]
    assert results[4]["ok"] and results[4]["id"] == "after"


# ------------------------------------------------------------------------ malformed (tritonclient)


def test_unknown_input_name(triton: TritonDriver) -> None:
    """An input the model does not take → INVALID_ARGUMENT naming it."""
    inputs = [*input_specs(rows(1)), tensor("velocity", "FP64", [1], [1.0])]
    assert_invalid(triton("infer", inputs=inputs), "velocity")


def test_wrong_datatype(triton: TritonDriver) -> None:
    """amount as INT32 → INVALID_ARGUMENT naming amount, what came and what is accepted."""
    inputs = [*without(input_specs(rows(2)), "amount"), tensor("amount", "INT32", [2], [1, 2])]
    reply = triton("infer", inputs=inputs)
    assert_invalid(reply, "amount", "INT32", "FP64")


def test_wrong_shape(triton: TritonDriver) -> None:
    """A [2, 3] tensor → INVALID_ARGUMENT naming the tensor and its shape."""
    amount = tensor("amount", "FP64", [2, 3], [1.0] * 6)
    inputs = [*without(input_specs(rows(2)), "amount"), amount]
    assert_invalid(triton("infer", inputs=inputs), "amount", "[2, 3]")


def test_row_count_mismatch(triton: TritonDriver) -> None:
    """Inputs with different row counts → INVALID_ARGUMENT naming the odd one."""
    mcc = tensor("mcc", "INT32", [3], [5411, 5411, 5411])
    assert_invalid(triton("infer", inputs=[*without(input_specs(rows(2)), "mcc"), mcc]), "mcc")


def test_missing_required_input(triton: TritonDriver) -> None:
    """Leaving out merchant_id → INVALID_ARGUMENT naming it."""
    inputs = without(input_specs(rows(2)), "merchant_id")
    assert_invalid(triton("infer", inputs=inputs), "merchant_id")


def test_duplicate_input(triton: TritonDriver) -> None:
    """The same input twice → INVALID_ARGUMENT naming it."""
    inputs = [*input_specs(rows(1)), tensor("channel", "BYTES", [1], ["pos"])]
    assert_invalid(triton("infer", inputs=inputs), "channel")


def test_invalid_row_value_names_row_and_field(triton: TritonDriver) -> None:
    """A negative amount in one row fails the request, naming the row and the field."""
    columns = rows(3)
    columns["amount"][1] = -4.0
    assert_invalid(triton("infer", inputs=input_specs(columns)), "row 1", "amount")


def test_unknown_model_is_not_found(triton: TritonDriver) -> None:
    """ModelInfer on an unknown model → NOT_FOUND."""
    reply = triton("infer", model="no-such-model", inputs=input_specs(rows(1)))
    assert not reply["ok"] and reply["status"] == NOT_FOUND, reply


# ------------------------------------------------------------------------ hand-built requests


def test_typed_contents_equal_score_batch(model_infer, oip_pb, server) -> None:
    """Inputs sent as typed ``contents`` score like ScoreBatch (and like raw inputs)."""
    columns = rows(4)
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    for name in STRING_INPUTS:
        typed = request.inputs.add(name=name, datatype="BYTES", shape=[4, 1])
        typed.contents.bytes_contents.extend(v.encode() for v in columns[name])
    typed = request.inputs.add(name="amount", datatype="FP64", shape=[4, 1])
    typed.contents.fp64_contents.extend(columns["amount"])
    typed = request.inputs.add(name="mcc", datatype="INT32", shape=[4, 1])
    typed.contents.int_contents.extend(columns["mcc"])
    typed = request.inputs.add(name="event_time_ms", datatype="INT64", shape=[4, 1])
    typed.contents.int64_contents.extend(columns["event_time_ms"])
    response = model_infer(request, timeout=10)
    names = [o.name for o in response.outputs]
    got = np.frombuffer(response.raw_output_contents[names.index("probability")], "<f8")
    batch = score_batch(server.target, fresh_copy(columns))
    assert got.tolist() == [r.probability for r in batch.results]
    assert list(response.outputs[0].shape) == [4, 1]


def test_missing_model_name_is_invalid(model_infer, oip_pb) -> None:
    """ModelInfer without a model name → INVALID_ARGUMENT."""
    request = raw_request(oip_pb, rows(1))
    request.model_name = ""
    raw_invalid(lambda: model_infer(request, timeout=10), "model name")


def test_raw_numeric_length_wrong(model_infer, oip_pb) -> None:
    """Raw FP64 content of the wrong byte length → INVALID_ARGUMENT naming the tensor."""
    request = raw_request(oip_pb, rows(2))
    index = [t.name for t in request.inputs].index("amount")
    request.raw_input_contents[index] = request.raw_input_contents[index][:-3]
    raw_invalid(lambda: model_infer(request, timeout=10), "amount", "13 bytes")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda raw: raw[:-1], id="truncated-element"),
        pytest.param(lambda raw: raw + b"\x00", id="trailing-bytes"),
        pytest.param(lambda raw: b"\xff\xff\xff\x7f" + raw[4:], id="length-overflow"),
        pytest.param(lambda raw: raw[:2], id="cut-length-prefix"),
    ],
)
def test_raw_bytes_tensor_malformed(model_infer, oip_pb, mutate) -> None:
    """Broken length-prefixed BYTES content → INVALID_ARGUMENT naming the tensor."""
    request = raw_request(oip_pb, rows(2))
    index = [t.name for t in request.inputs].index("merchant_id")
    request.raw_input_contents[index] = mutate(request.raw_input_contents[index])
    raw_invalid(lambda: model_infer(request, timeout=10), "merchant_id")


def test_raw_bytes_not_utf8(model_infer, oip_pb) -> None:
    """A BYTES element that is not UTF-8 → INVALID_ARGUMENT naming the tensor."""
    request = raw_request(oip_pb, rows(1))
    index = [t.name for t in request.inputs].index("country")
    request.raw_input_contents[index] = struct.pack("<I", 2) + b"\xc3\x28"
    raw_invalid(lambda: model_infer(request, timeout=10), "country", "UTF-8")


def test_raw_contents_for_some_inputs_only(model_infer, oip_pb) -> None:
    """raw_input_contents must cover every input or none."""
    request = raw_request(oip_pb, rows(1))
    del request.raw_input_contents[-1]
    raw_invalid(lambda: model_infer(request, timeout=10), "raw_input_contents")


def test_typed_contents_count_wrong(model_infer, oip_pb) -> None:
    """Typed contents with fewer elements than the shape says → INVALID_ARGUMENT."""
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    typed = request.inputs.add(name="amount", datatype="FP64", shape=[3])
    typed.contents.fp64_contents.extend([1.0, 2.0])
    raw_invalid(lambda: model_infer(request, timeout=10), "amount", "fp64_contents")


def test_too_many_rows_declared(model_infer, oip_pb) -> None:
    """A shape past max_batch_rows is refused before any content is read."""
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="amount", datatype="FP64", shape=[2**40])
    raw_invalid(lambda: model_infer(request, timeout=10), "amount", "limit")


def test_huge_unknown_input_name_keeps_invalid_argument(model_infer, oip_pb) -> None:
    """An unknown 20k-character input name is still INVALID_ARGUMENT."""
    request = raw_request(oip_pb, rows(1))
    request.inputs.add(name="v" * 20_000, datatype="FP64", shape=[1])
    request.raw_input_contents.append(np.ones(1).tobytes())
    raw_invalid(lambda: model_infer(request, timeout=10))


def test_rejected_infer_leaves_card_state_alone(model_infer, oip_pb, forest) -> None:
    """A request refused with INVALID_ARGUMENT must not have applied any of its rows."""
    columns = rows(2)
    columns["amount"][1] = -1.0
    raw_invalid(lambda: model_infer(raw_request(oip_pb, columns), timeout=10), "amount")
    first = {name: values[:1] for name, values in columns.items()}
    offline = offline_probabilities(forest, {k: v * 2 for k, v in first.items()})
    assert offline[0] != offline[1], "test data: a repeated payment must change the score"
    response = model_infer(raw_request(oip_pb, first), timeout=10)
    served = np.frombuffer(response.raw_output_contents[0], "<f8")[0]
    # The card's first payment, as if the rejected call never happened (offline[1] = seen twice).
    assert served == offline[0], (served, offline)


def test_server_healthy_after_malformed_requests(triton: TritonDriver) -> None:
    """After every malformed request above, the model still serves."""
    assert triton("ready")["value"] and triton("model_ready", name=MODEL)["value"]
    reply = triton("infer", inputs=input_specs(rows(1)))
    assert reply["ok"] and reply["outputs"]["probability"]["shape"] == [1]


def test_ready_made_feature_rows_are_scored_statelessly(model_infer, oip_pb, forest) -> None:
    """A ``features`` FP64 [n, 23] tensor (what a primary riskwire sends its remote shadow)."""
    rng = np.random.default_rng(11)
    features = rng.random((5, 23)) * 10
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="features", datatype="FP64", shape=[5, 23])
    request.raw_input_contents.append(features.astype("<f8").tobytes())
    first = model_infer(request, timeout=10)
    second = model_infer(request, timeout=10)  # no state: the same rows score the same
    names = [o.name for o in first.outputs]
    probabilities = np.frombuffer(first.raw_output_contents[names.index("probability")], "<f8")
    np.testing.assert_array_equal(probabilities, forest.predict(features))
    assert first.raw_output_contents == second.raw_output_contents
    typed = oip_pb.ModelInferRequest(model_name=MODEL)
    tensor = typed.inputs.add(name="features", datatype="FP32", shape=[5, 23])
    tensor.contents.fp32_contents.extend(features.astype(np.float32).ravel().tolist())
    assert len(model_infer(typed, timeout=10).outputs) == 2
    bad = oip_pb.ModelInferRequest(model_name=MODEL)
    bad.inputs.add(name="features", datatype="FP64", shape=[5, 22])
    bad.raw_input_contents.append(features[:, :22].astype("<f8").tobytes())
    assert "[n, 23]" in raw_invalid(lambda: model_infer(bad, timeout=10), "features")
