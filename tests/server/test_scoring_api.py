"""riskwire.v1.Scoring through RiskwireClient / AsyncRiskwireClient against a real server."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from riskwire.clients.client import AsyncRiskwireClient, RiskwireClient, ScoreResult
from riskwire.kernels.encoding import encode_columns
from riskwire.kernels.features import compute_features_offline
from riskwire.kernels.schema import FEATURE_NAMES
from riskwire.protos import scoring_pb2, scoring_pb2_grpc

pytestmark = pytest.mark.timeout(300)

DECISIONS = ("approve", "review", "decline")
T0 = 1_767_225_600_000 + 12 * 3_600_000  # 2026-01-01T12:00Z


def tx(card_id: str | None = None, **fields: object) -> dict[str, object]:
    """A valid transaction dict on a fresh card (fields override the defaults)."""
    values: dict[str, object] = {
        "transaction_id": f"tx-{uuid.uuid4().hex[:12]}",
        "card_id": f"card-{uuid.uuid4().hex}" if card_id is None else card_id,
        "merchant_id": "m-00042",
        "mcc": 5411,
        "amount": 42.5,
        "currency": "EUR",
        "country": "DE",
        "card_country": "DE",
        "channel": "pos",
        "event_time_ms": T0,
    }
    values.update(fields)
    return values


def risky_burst(card_id: str, n: int) -> list[dict[str, object]]:
    """A card-testing-like burst: small foreign e-commerce payments seconds apart."""
    return [
        tx(
            card_id,
            merchant_id=f"m-{i % 3}",
            mcc=5732 if i % 2 else 4829,
            amount=1.0 + i,
            currency="RUB",
            country="RU",
            card_country="DE",
            channel="ecommerce",
            event_time_ms=T0 + i * 20_000,
        )
        for i in range(n)
    ]


def expected_decision(probability: float, thresholds: dict[str, float]) -> str:
    """The decision the package thresholds give a probability."""
    if probability >= thresholds["decline"]:
        return "decline"
    if probability >= thresholds["review"]:
        return "review"
    return "approve"


def offline_row(transaction: dict[str, object]) -> np.ndarray:
    """Feature row of a card's first transaction, computed offline."""
    columns = {k: [transaction[k]] for k in transaction if k != "event_time_ms"}
    columns["event_time"] = [transaction["event_time_ms"]]
    features, _ = compute_features_offline(encode_columns(columns))
    return features[0]


@pytest.fixture(scope="module")
def client(server) -> Iterator[RiskwireClient]:
    """A sync client on the shared server (generous deadline: 2 shared cores)."""
    with RiskwireClient(server.target, timeout_s=10.0) as c:
        yield c


# ------------------------------------------------------------------------ Score


def test_score_returns_probability_decision_and_model(client: RiskwireClient, thresholds) -> None:
    """Probability in [0, 1], decision from the package thresholds, model name/version."""
    result = client.score(tx())
    assert 0.0 <= result.probability <= 1.0
    assert result.decision == expected_decision(result.probability, thresholds)
    assert (result.model_name, result.model_version) == ("fraud", "1")
    assert result.error is None


def test_decisions_follow_package_thresholds(client: RiskwireClient, thresholds) -> None:
    """Every decision over a mix of ordinary and burst traffic matches the thresholds."""
    results = [client.score(tx(amount=a, channel="pos")) for a in (3.0, 40.0, 900.0)]
    results += [client.score(t) for t in risky_burst(f"card-{uuid.uuid4().hex}", 8)]
    seen = set()
    for result in results:
        assert result.decision == expected_decision(result.probability, thresholds), result
        seen.add(result.decision)
    assert {"approve", "decline"} <= seen


def test_request_id_generated_when_empty_and_echoed_when_given(client: RiskwireClient) -> None:
    """An empty request_id gets a fresh server id; a given one comes back unchanged."""
    first, second = client.score(tx()), client.score(tx())
    assert first.request_id and second.request_id and first.request_id != second.request_id
    assert client.score(tx(), request_id="my-req-17").request_id == "my-req-17"


def test_transaction_id_echoed(client: RiskwireClient) -> None:
    """transaction_id is returned as sent (and may be empty)."""
    assert client.score(tx(transaction_id="pay-123")).transaction_id == "pay-123"
    assert client.score(tx(transaction_id="")).transaction_id == ""


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_reasons_count_and_names(client: RiskwireClient, k: int) -> None:
    """At most k reasons, named from FEATURE_NAMES, largest contribution first, all > 0.

    A reason's value may be NaN: a missing feature (e.g. no previous payment) can still
    push the score up through the trees' missing-value routing.
    """
    result = client.score(tx(), top_reasons=k)
    assert len(result.reasons) <= k
    contributions = [c for _, c, _ in result.reasons]
    assert contributions == sorted(contributions, reverse=True)
    for feature, contribution, _value in result.reasons:
        assert feature in FEATURE_NAMES
        assert contribution > 0 and math.isfinite(contribution)


def test_top_reasons_default_is_three(client: RiskwireClient) -> None:
    """top_reasons = 0 means the server default (3)."""
    assert 0 < len(client.score(tx(), top_reasons=0).reasons) <= 3


def test_top_reasons_match_offline_contributions(client: RiskwireClient, forest) -> None:
    """Reasons equal the forest's top contributions over the offline feature row."""
    transaction = tx()
    result = client.score(transaction, top_reasons=5)
    row = offline_row(transaction)
    want = [(FEATURE_NAMES[j], c, float(row[j])) for j, c in forest.top_reasons(row, 5)]
    assert [r[0] for r in result.reasons] == [w[0] for w in want]
    np.testing.assert_allclose([r[1:] for r in result.reasons], [w[1:] for w in want], rtol=1e-12)
    assert result.probability == pytest.approx(forest.predict(row[None, :])[0], abs=1e-12)


@pytest.mark.parametrize("k", [11, 1000, -1])
def test_top_reasons_out_of_range_is_invalid_argument(client: RiskwireClient, k: int) -> None:
    """top_reasons outside 0..10 → INVALID_ARGUMENT naming top_reasons."""
    with pytest.raises(grpc.RpcError) as info:
        client.score(tx(), top_reasons=k)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_reasons" in info.value.details()


# ------------------------------------------------------------------------ errors


def test_unknown_model_is_not_found(client: RiskwireClient) -> None:
    """An unknown model name → NOT_FOUND naming the model and what is loaded."""
    with pytest.raises(grpc.RpcError) as info:
        client.score(tx(), model="no-such-model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in info.value.details() and "fraud" in info.value.details()


def test_unknown_version_is_not_found(client: RiskwireClient) -> None:
    """An unknown version of a loaded model → NOT_FOUND listing the loaded versions."""
    with pytest.raises(grpc.RpcError) as info:
        client.score(tx(), model="fraud", version="999")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "999" in info.value.details()


def test_explicit_model_and_version(client: RiskwireClient) -> None:
    """Naming the model and its version explicitly works."""
    result = client.score(tx(), model="fraud", version="1")
    assert (result.model_name, result.model_version) == ("fraud", "1")


@pytest.mark.parametrize("field", ["model", "version"])
def test_huge_model_name_or_version_keeps_not_found(client: RiskwireClient, field: str) -> None:
    """A 20k-character model name/version is still NOT_FOUND (message clipped if need be)."""
    with pytest.raises(grpc.RpcError) as info:
        client.score(tx(), **{field: "x" * 20_000})
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()


def test_missing_transaction_is_invalid_argument(client: RiskwireClient) -> None:
    """A ScoreRequest without a transaction → INVALID_ARGUMENT naming the field."""
    stub = scoring_pb2_grpc.ScoringStub(client.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(scoring_pb2.ScoreRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transaction" in info.value.details()


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"card_id": ""}, "card_id"),
        ({"merchant_id": ""}, "merchant_id"),
        ({"amount": float("nan")}, "amount"),
        ({"amount": float("inf")}, "amount"),
        ({"amount": -0.01}, "amount"),
        ({"event_time_ms": -1}, "event_time_ms"),
    ],
)
def test_invalid_field_is_invalid_argument(
    client: RiskwireClient, fields: dict[str, object], name: str
) -> None:
    """Bad field values → INVALID_ARGUMENT whose message names the field."""
    with pytest.raises(grpc.RpcError) as info:
        client.score(tx(**fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"transaction.{name}" in info.value.details()


def test_expired_deadline_fails_and_server_stays_healthy(client: RiskwireClient, server) -> None:
    """An already-expired deadline → DEADLINE_EXCEEDED; the server keeps serving.

    gRPC rounds deadlines to milliseconds, so a 1 µs call to a warm loopback server can
    still succeed: only a deadline already in the past fails on every run.
    """
    for _ in range(20):
        with pytest.raises(grpc.RpcError) as info:
            client.score(tx(), timeout_s=-0.001)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(20):  # a tiny deadline: either outcome is fine, no other status
        try:
            client.score(tx(), timeout_s=1e-6)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_health(timeout_s=10)
    assert 0.0 <= client.score(tx()).probability <= 1.0


def test_unknown_metadata_is_ignored(server) -> None:
    """Client-level and per-call metadata (unknown to the server) do not change results."""
    transaction = tx()
    fresh = dict(transaction, card_id=f"card-{uuid.uuid4().hex}")
    with RiskwireClient(
        server.target, timeout_s=10, metadata=[("x-tenant", "acme"), ("x-trace", "t1")]
    ) as c:
        with_metadata = c.score(transaction, metadata=[("x-extra", "1")])
    with RiskwireClient(server.target, timeout_s=10) as c:
        plain = c.score(fresh)
    assert with_metadata.probability == plain.probability


class _RecordingScoring(scoring_pb2_grpc.ScoringServicer):
    """An in-process fake Scoring service that records each call's metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def Score(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return scoring_pb2.ScoreResponse(request_id=request.request_id, probability=0.5)


def test_metadata_reaches_the_server() -> None:
    """The client sends its own metadata plus each call's (checked on a fake server)."""
    fake = _RecordingScoring()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    scoring_pb2_grpc.add_ScoringServicer_to_server(fake, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with RiskwireClient(
            f"127.0.0.1:{port}", metadata=[("x-tenant", "acme")], timeout_s=10
        ) as c:
            c.score(tx(), metadata=[("x-call", "42")])
            c.score(tx())
    finally:
        grpc_server.stop(None)
    assert fake.metadata[0]["x-tenant"] == "acme" and fake.metadata[0]["x-call"] == "42"
    assert fake.metadata[1]["x-tenant"] == "acme" and "x-call" not in fake.metadata[1]


# ------------------------------------------------------------------------ ScoreBatch


def test_batch_results_in_order_with_per_item_error(client: RiskwireClient) -> None:
    """A negative amount fails its own item only; the others score, in request order."""
    rows = [tx(transaction_id=f"b-{i}") for i in range(5)]
    rows[2]["amount"] = -5.0
    results = client.score_batch(rows)
    assert [r.transaction_id for r in results] == [f"b-{i}" for i in range(5)]
    code, message = results[2].error
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "amount" in message and "transactions[2]" in message
    for i in (0, 1, 3, 4):
        assert results[i].error is None
        assert 0.0 <= results[i].probability <= 1.0
        assert results[i].decision in DECISIONS
        assert (results[i].model_name, results[i].model_version) == ("fraud", "1")


def test_batch_equals_single_scoring_for_fresh_cards(client: RiskwireClient) -> None:
    """Same rows on fresh cards: ScoreBatch probabilities == one Score call each."""
    template = [
        tx(amount=a, mcc=m, channel=c, country=k, event_time_ms=T0 + i * 60_000)
        for i, (a, m, c, k) in enumerate(
            [
                (5.0, 5411, "pos", "DE"),
                (250.0, 5732, "ecommerce", "US"),
                (80.0, 4829, "moto", "RU"),
                (19.99, 5812, "contactless", "FR"),
                (600.0, 6011, "atm", "DE"),
            ]
        )
    ]
    batch_rows = [dict(t, card_id=f"card-{uuid.uuid4().hex}") for t in template]
    single_rows = [dict(t, card_id=f"card-{uuid.uuid4().hex}") for t in template]
    batch = client.score_batch(batch_rows)
    single = [client.score(t) for t in single_rows]
    assert [b.probability for b in batch] == [s.probability for s in single]
    assert [b.decision for b in batch] == [s.decision for s in single]


def test_batch_request_id_and_top_reasons(client: RiskwireClient) -> None:
    """The batch response carries its request_id; reasons only when asked for."""
    stub = scoring_pb2_grpc.ScoringStub(client.channel)
    request = scoring_pb2.ScoreBatchRequest(
        transactions=[scoring_pb2.Transaction(**tx()) for _ in range(3)], request_id="batch-1"
    )
    response = stub.ScoreBatch(request, timeout=10)
    assert response.request_id == "batch-1"
    assert (response.model_name, response.model_version) == ("fraud", "1")
    assert all(not r.reasons for r in response.results)
    with_reasons = client.score_batch([tx(), tx()], top_reasons=2)
    assert all(0 < len(r.reasons) <= 2 for r in with_reasons)
    generated = stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(transactions=[]), timeout=10)
    assert generated.request_id and not generated.results


def test_batch_unknown_model_and_bad_top_reasons_fail_whole_call(client: RiskwireClient) -> None:
    """Errors about the call itself (not a row) fail the call."""
    with pytest.raises(grpc.RpcError) as info:
        client.score_batch([tx()], model="nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.score_batch([tx()], top_reasons=11)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------ ScoreStream


def test_stream_in_order_and_continues_after_bad_item(client: RiskwireClient) -> None:
    """One response per request, in order; a bad item's error does not end the stream."""
    rows = [tx(transaction_id=f"s-{i}") for i in range(6)]
    rows[1]["amount"] = float("nan")
    rows[4]["card_id"] = ""
    results = list(client.score_stream(rows, timeout_s=30))
    assert [r.transaction_id for r in results] == [f"s-{i}" for i in range(6)]
    assert results[1].error is not None and "amount" in results[1].error[1]
    assert results[4].error is not None and "card_id" in results[4].error[1]
    for i in (0, 2, 3, 5):
        assert results[i].error is None and 0.0 <= results[i].probability <= 1.0


def test_stream_item_without_transaction_and_unknown_model(client: RiskwireClient) -> None:
    """Missing transaction / unknown model are per-item errors on the raw stream."""
    stub = scoring_pb2_grpc.ScoringStub(client.channel)
    requests = [
        scoring_pb2.ScoreRequest(request_id="r0"),
        scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(**tx()), model_name="nope"),
        scoring_pb2.ScoreRequest(transaction=scoring_pb2.Transaction(**tx()), request_id="r2"),
    ]
    responses = list(stub.ScoreStream(iter(requests), timeout=30))
    assert len(responses) == 3
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "transaction" in responses[0].error.message and responses[0].request_id == "r0"
    assert responses[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert not responses[2].HasField("error") and responses[2].request_id == "r2"


# ------------------------------------------------------------------------ asyncio client


def test_async_client_basic_calls(server) -> None:
    """AsyncRiskwireClient: score, score_batch, score_stream and error codes."""

    async def run() -> tuple[ScoreResult, list[ScoreResult], list[ScoreResult], grpc.StatusCode]:
        async with AsyncRiskwireClient(server.target, timeout_s=10) as c:
            one = await c.score(tx(transaction_id="a-1"), request_id="async-1", top_reasons=2)
            batch = await c.score_batch([tx(), tx(amount=-1.0), tx()])
            stream = [r async for r in c.score_stream([tx(), tx(amount=float("nan")), tx()])]
            try:
                await c.score(tx(), model="nope")
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            else:
                code = grpc.StatusCode.OK
        return one, batch, stream, code

    one, batch, stream, code = asyncio.run(run())
    assert one.request_id == "async-1" and one.transaction_id == "a-1"
    assert 0.0 <= one.probability <= 1.0 and one.decision in DECISIONS
    assert len(one.reasons) <= 2
    assert [r.error is None for r in batch] == [True, False, True]
    assert [r.error is None for r in stream] == [True, False, True]
    assert code == grpc.StatusCode.NOT_FOUND


def test_async_and_sync_clients_agree(server, client: RiskwireClient) -> None:
    """The same transaction on two fresh cards scores the same through both clients."""
    template = tx(amount=123.0, channel="ecommerce")

    async def run() -> ScoreResult:
        async with AsyncRiskwireClient(server.target, timeout_s=10) as c:
            return await c.score(dict(template, card_id=f"card-{uuid.uuid4().hex}"))

    async_result = asyncio.run(run())
    sync_result = client.score(dict(template, card_id=f"card-{uuid.uuid4().hex}"))
    assert async_result.probability == sync_result.probability
