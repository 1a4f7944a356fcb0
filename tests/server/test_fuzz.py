"""Nothing a client sends can crash a worker: typed, raw and mutated messages.

(a) Hypothesis builds ScoreRequest / ScoreBatchRequest messages with hostile values;
(b) random and mutated bytes go to Score, ScoreBatch and ModelInfer through a generic
channel; (c) afterwards the server is healthy, no worker was restarted and scoring a
fresh card gives the same probability as before.

For Score and ScoreBatch, grpcio answers bytes that do not parse as the request
message with INTERNAL "Exception deserializing request!" before any riskwire code runs;
that is the only INTERNAL tolerated here (for raw bytes to those two only: ModelInfer
takes its request as bytes and answers INVALID_ARGUMENT), and RESOURCE_EXHAUSTED only
for a request over the server's 16 MiB message limit. Any other INTERNAL, UNKNOWN, UNAVAILABLE or
RESOURCE_EXHAUSTED means riskwire code failed or a worker died. About 8,000 messages
in all, spread over both workers.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from riskwire.protos import scoring_pb2, scoring_pb2_grpc

pytestmark = pytest.mark.timeout(300)

CLEAN_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the server's default max_message_bytes
DESERIALIZE_ERROR = "Exception deserializing request!"
RAW_MESSAGES_PER_METHOD = 1500
CALL_TIMEOUT_S = 20.0
SCORE_EXAMPLES = 1500
BATCH_EXAMPLES = 500
FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------------ strategies

_chars = st.characters(exclude_categories=("Cs",))  # protobuf strings must be valid UTF-8
_short = st.text(_chars, max_size=40)
texts = st.one_of(
    st.just(""),
    _short,
    _short,
    st.sampled_from(["card-000001", "DE", "EUR", "pos", "ecommerce", "\x00", "💳", "Ω" * 3]),
    _short,
    st.builds(lambda c, n: c * n, _chars, st.integers(1_000, 100_000)),  # very long
)
# Model name and version come back inside error messages, which travel in HTTP/2
# trailers (16 KiB hard limit); long ones have their own test in
# test_scoring_api.py, so they stay short here.
short_texts = st.one_of(st.just(""), _short, st.builds(lambda c: c * 300, _chars))
amounts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1e-300, 1e308, 5e-324, float("nan"), float("-inf")]),
)
int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 1_767_225_600_000]),
)
model_names = st.one_of(st.just(""), st.just(""), st.just("fraud"), short_texts)
versions = st.one_of(
    st.just(""), st.just(""), st.just("1"), st.sampled_from(["0", "999", "-1", "v1"])
)
top_reasons = st.one_of(st.integers(-1, 11), st.integers(0, 10), int32s)

hostile_transactions = st.builds(
    scoring_pb2.Transaction,
    transaction_id=texts,
    card_id=texts,
    merchant_id=texts,
    mcc=int32s,
    amount=amounts,
    currency=texts,
    country=texts,
    card_country=texts,
    channel=texts,
    event_time_ms=int64s,
)
# Strange but acceptable values, so the scoring path itself (not only validation) is fuzzed.
nonempty = st.one_of(
    st.text(_chars, min_size=1, max_size=40),
    st.sampled_from(["card-000001", "\x00", "💳", " ", "Ω" * 3]),
    st.builds(lambda c, n: c * n, _chars, st.integers(1_000, 100_000)),
)
plausible_transactions = st.builds(
    scoring_pb2.Transaction,
    transaction_id=texts,
    card_id=nonempty,
    merchant_id=nonempty,
    mcc=int32s,
    amount=st.one_of(st.floats(0.0, 1e308), st.sampled_from([0.0, -0.0, 5e-324, 1e308, 0.01, 1e9])),
    currency=texts,
    country=texts,
    card_country=texts,
    channel=texts,
    event_time_ms=st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 1, 2**63 - 1])),
)
transactions = st.one_of(hostile_transactions, plausible_transactions, plausible_transactions)
score_requests = st.builds(
    scoring_pb2.ScoreRequest,
    transaction=st.one_of(st.none(), transactions, plausible_transactions),
    model_name=model_names,
    model_version=versions,
    request_id=texts,
    top_reasons=top_reasons,
)
batch_requests = st.builds(
    scoring_pb2.ScoreBatchRequest,
    transactions=st.lists(transactions, max_size=12),
    model_name=model_names,
    model_version=versions,
    request_id=texts,
    top_reasons=top_reasons,
)


def valid_transaction(card_id: str) -> scoring_pb2.Transaction:
    """A fixed, valid transaction on ``card_id``."""
    return scoring_pb2.Transaction(
        transaction_id="t-1",
        card_id=card_id,
        merchant_id="m-00042",
        mcc=5732,
        amount=129.99,
        currency="EUR",
        country="FR",
        card_country="DE",
        channel="ecommerce",
        event_time_ms=1_767_225_600_000 + 20 * 3_600_000,
    )


def valid_one_row_infer_request(oip_pb) -> bytes:
    """A valid serialized one-row ModelInferRequest with typed contents (the fast path
    of server/grpc/infer_wire.py)."""
    request = oip_pb.ModelInferRequest(model_name="fraud", id="fuzz-1")
    texts = {"card_id": b"card-fz-1", "merchant_id": b"m-1", "currency": b"EUR", "country": b"DE",
             "card_country": b"DE", "channel": b"pos"}  # fmt: skip
    for name, value in texts.items():
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(value)
    request.inputs.add(name="amount", datatype="FP64", shape=[1, 1]).contents.fp64_contents.append(
        12.5
    )
    request.inputs.add(name="mcc", datatype="INT32", shape=[1]).contents.int_contents.append(5411)
    return request.SerializeToString()


def valid_infer_request(oip_pb) -> bytes:
    """A valid serialized ModelInferRequest (two rows, raw inputs)."""
    request = oip_pb.ModelInferRequest(model_name="fraud", id="fuzz")
    strings = {
        "card_id": ["card-fz-a", "card-fz-b"],
        "merchant_id": ["m-1", "m-2"],
        "currency": ["EUR", "USD"],
        "country": ["DE", "US"],
        "card_country": ["DE", "DE"],
        "channel": ["pos", "ecommerce"],
    }
    for name, values in strings.items():
        request.inputs.add(name=name, datatype="BYTES", shape=[2])
        request.raw_input_contents.append(
            b"".join(len(v).to_bytes(4, "little") + v.encode() for v in values)
        )
    request.inputs.add(name="amount", datatype="FP64", shape=[2, 1])
    request.raw_input_contents.append(np.array([12.5, 99.0], "<f8").tobytes())
    request.inputs.add(name="mcc", datatype="INT32", shape=[2, 1])
    request.raw_input_contents.append(np.array([5411, 5732], "<i4").tobytes())
    request.inputs.add(name="event_time_ms", datatype="INT64", shape=[2])
    request.raw_input_contents.append(np.array([1, 2], "<i8").tobytes())
    request.outputs.add(name="probability")
    return request.SerializeToString()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Flip bits, truncate, insert, delete or duplicate a slice of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(buf) + 1)
        if kind == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del buf[at:]
        elif kind == 2:
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3:
            del buf[at : at + rng.randint(1, 16)]
        elif kind == 4 and buf:
            buf[min(at, len(buf) - 1)] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
        else:
            buf[at:at] = buf[at : at + rng.randint(1, 32)]
    return bytes(buf)


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def baseline(server) -> dict[str, object]:
    """Worker pids and a fresh card's probability before any fuzzing."""
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        request = scoring_pb2.ScoreRequest(transaction=valid_transaction(f"c-{uuid.uuid4().hex}"))
        probability = stub.Score(request, timeout=CALL_TIMEOUT_S).probability
    return {"workers": server.worker_pids(), "probability": probability}


@pytest.fixture(scope="module")
def worker_channels(server, baseline) -> Iterator[list[grpc.Channel]]:
    """One channel per worker (after the baseline was taken), so both get fuzzed."""
    channels = server.connect_each_worker()
    yield [channels[pid] for pid in sorted(channels)]
    for channel in channels.values():
        channel.close()


@pytest.fixture(scope="module")
def stubs(worker_channels: list[grpc.Channel]) -> list[scoring_pb2_grpc.ScoringStub]:
    """A typed Scoring stub per worker."""
    return [scoring_pb2_grpc.ScoringStub(channel) for channel in worker_channels]


def check_status(exc: grpc.RpcError, *, raw: bool, size: int = 0) -> None:
    """Only clean client-error codes (and grpcio's own parse failure for raw bytes).

    RESOURCE_EXHAUSTED is clean only for a request over the server's message limit.
    """
    code = exc.code()
    if raw and code == grpc.StatusCode.INTERNAL and exc.details() == DESERIALIZE_ERROR:
        return
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and size > MAX_MESSAGE_BYTES:
        return
    assert code in CLEAN_CODES, f"{code}: {exc.details()[:500]}"


# ------------------------------------------------------------------------ (a) typed


@settings(FUZZ_SETTINGS, max_examples=SCORE_EXAMPLES)
@given(request=score_requests, worker=st.integers(0, 1))
def test_fuzz_score(stubs, request: scoring_pb2.ScoreRequest, worker: int) -> None:
    """Score answers OK with a valid result, or INVALID_ARGUMENT / NOT_FOUND."""
    try:
        response = stubs[worker].Score(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        check_status(exc, raw=False, size=request.ByteSize())
        event(exc.code().name)
        return
    event("OK")
    assert 0.0 <= response.probability <= 1.0
    assert response.decision != scoring_pb2.DECISION_UNSPECIFIED
    assert len(response.reasons) <= 10


@settings(FUZZ_SETTINGS, max_examples=BATCH_EXAMPLES)
@given(request=batch_requests, worker=st.integers(0, 1))
def test_fuzz_score_batch(stubs, request: scoring_pb2.ScoreBatchRequest, worker: int) -> None:
    """ScoreBatch: OK with one result per row (each scored or a clean item error)."""
    try:
        response = stubs[worker].ScoreBatch(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        check_status(exc, raw=False, size=request.ByteSize())
        event(exc.code().name)
        return
    event("OK")
    assert len(response.results) == len(request.transactions)
    clean = {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    for result in response.results:
        if result.HasField("error"):
            assert result.error.code in clean, result.error
        else:
            assert 0.0 <= result.probability <= 1.0 and not math.isnan(result.probability)


# ------------------------------------------------------------------------ (b) raw bytes


@pytest.mark.parametrize(
    ("method", "seed_message"),
    [
        ("/riskwire.v1.Scoring/Score", "score"),
        ("/riskwire.v1.Scoring/ScoreBatch", "batch"),
        ("/inference.GRPCInferenceService/ModelInfer", "infer"),
        ("/inference.GRPCInferenceService/ModelInfer", "infer_one"),
    ],
)
def test_fuzz_raw_bytes(
    worker_channels: list[grpc.Channel], oip_pb, method: str, seed_message: str
) -> None:
    """Random bytes and mutations of a valid message: never a crash, only clean errors."""
    if seed_message == "infer":
        valid = valid_infer_request(oip_pb)
    elif seed_message == "infer_one":
        valid = valid_one_row_infer_request(oip_pb)
    elif seed_message == "score":
        score = scoring_pb2.ScoreRequest(
            transaction=valid_transaction("card-fz-raw"), top_reasons=3
        )
        valid = score.SerializeToString()
    else:
        transactions = [valid_transaction("card-fz-raw"), valid_transaction("card-fz-raw2")]
        valid = scoring_pb2.ScoreBatchRequest(transactions=transactions).SerializeToString()
    calls = [
        channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        for channel in worker_channels
    ]
    rng = random.Random(f"{method}-7")
    outcomes: dict[str, int] = {}
    for i in range(RAW_MESSAGES_PER_METHOD):
        if i % 5 == 0:
            payload = rng.randbytes(rng.choice((0, 1, 2, 5, 17, 64, 300)))
        else:
            payload = mutate(valid, rng)
        try:
            calls[i % len(calls)](payload, timeout=CALL_TIMEOUT_S)
            outcomes["OK"] = outcomes.get("OK", 0) + 1
        except grpc.RpcError as exc:
            # ModelInfer reads its own bytes: undecodable ones are INVALID_ARGUMENT too
            check_status(exc, raw=not seed_message.startswith("infer"), size=len(payload))
            outcomes[exc.code().name] = outcomes.get(exc.code().name, 0) + 1
    assert outcomes.get("OK", 0) > 0, outcomes  # some mutations reach and pass the handler


# ------------------------------------------------------------------------ (c) aftermath


def test_server_unharmed_after_fuzzing(server, baseline) -> None:
    """Healthy, same worker pids (no crash or restart), same score for a fresh card."""
    server.wait_health(timeout_s=30)
    assert server.process.poll() is None
    assert server.worker_pids() == baseline["workers"]
    assert "exited with" not in server.log(), server.log_tail()
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        request = scoring_pb2.ScoreRequest(transaction=valid_transaction(f"c-{uuid.uuid4().hex}"))
        assert stub.Score(request, timeout=CALL_TIMEOUT_S).probability == baseline["probability"]
    assert "unexpected error" not in server.log(), server.log_tail()
