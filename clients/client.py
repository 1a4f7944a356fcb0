"""Python clients for riskwire.v1.Scoring: :class:`RiskwireClient` and :class:`AsyncRiskwireClient`.

One channel per client, reused for every call; per-call deadlines; retries for
UNAVAILABLE configured through gRPC's service config (so they follow gRPC's retry
throttling and never retry a call that already reached the server's handler with a
different status); metadata passthrough on every call.

    with RiskwireClient("127.0.0.1:50051") as client:
        result = client.score({"card_id": "c1", "merchant_id": "m1", "amount": 12.5, ...})
        print(result.probability, result.decision)
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace as otel_trace

from riskwire.protos import scoring_pb2, scoring_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
Metadata = Sequence[tuple[str, str]]
_DECISION_NAMES = {
    scoring_pb2.DECISION_APPROVE: "approve",
    scoring_pb2.DECISION_REVIEW: "review",
    scoring_pb2.DECISION_DECLINE: "decline",
    scoring_pb2.DECISION_UNSPECIFIED: "",
}
TRANSACTION_FIELDS = tuple(f.name for f in scoring_pb2.Transaction.DESCRIPTOR.fields)


@dataclass(frozen=True)
class ScoreResult:
    """One scored transaction (``error`` set, and no score, when that item failed)."""

    request_id: str
    transaction_id: str
    probability: float
    decision: str
    model_name: str
    model_version: str
    reasons: list[tuple[str, float, float]] = field(default_factory=list)
    error: tuple[int, str] | None = None  # (google.rpc code, message)


def service_config(max_attempts: int) -> str:
    """gRPC service config JSON that retries UNAVAILABLE with exponential backoff."""
    config = {
        "methodConfig": [{
            "name": [{"service": "riskwire.v1.Scoring"}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
    }  # fmt: skip
    return json.dumps(config)


def channel_options(max_attempts: int, max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel arguments of both clients."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if max_attempts > 1:
        options += [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(max_attempts)),
        ]
    return options


def to_transaction(value: Mapping[str, Any] | scoring_pb2.Transaction) -> scoring_pb2.Transaction:
    """A Transaction message from a dict of its fields (unknown keys are an error)."""
    if isinstance(value, scoring_pb2.Transaction):
        return value
    unknown = sorted(set(value) - set(TRANSACTION_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown transaction field(s) {', '.join(unknown)}; "
            f"expected {', '.join(TRANSACTION_FIELDS)}"
        )
    return scoring_pb2.Transaction(**value)


def from_response(response: scoring_pb2.ScoreResponse, request_id: str = "") -> ScoreResult:
    """A ScoreResult from a ScoreResponse message (batch items take the batch's id)."""
    error = (response.error.code, response.error.message) if response.HasField("error") else None
    return ScoreResult(
        request_id=response.request_id or request_id,
        transaction_id=response.transaction_id,
        probability=response.probability,
        decision=_DECISION_NAMES.get(response.decision, ""),
        model_name=response.model_name,
        model_version=response.model_version,
        reasons=[(r.feature, r.contribution, r.value) for r in response.reasons],
        error=error,
    )


_LABELS = {
    **dict.fromkeys(("fraud", "1", "true"), scoring_pb2.LABEL_FRAUD),
    **dict.fromkeys(("legitimate", "0", "false"), scoring_pb2.LABEL_LEGITIMATE),
}


def to_outcome(value: Mapping[str, Any]) -> scoring_pb2.LabelledOutcome:
    """A LabelledOutcome from ``{"request_id" or "transaction_id", "label", "labelled_at_ms"}``;
    ``label`` is "fraud"/"legitimate", 1/0 or True/False (also as text)."""
    label = value["label"]
    code = _LABELS.get(str(int(label) if isinstance(label, bool) else label).strip().lower())
    if code is None:
        raise ValueError(f"label {label!r}: expected 'fraud', 'legitimate', 1 or 0")
    return scoring_pb2.LabelledOutcome(
        request_id=value.get("request_id") or "",
        transaction_id=value.get("transaction_id") or "",
        label=code,
        labelled_at_ms=int(value.get("labelled_at_ms") or 0),
    )


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """W3C ``traceparent`` of the caller's current OpenTelemetry span (if any), so the
    server's records of the call join the caller's trace."""
    context = otel_trace.get_current_span().get_span_context()
    if not context.is_valid:
        return ()
    flags = int(context.trace_flags)
    return (("traceparent", f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"),)


def _score_request(
    transaction,
    model: str,
    version: str,
    top_reasons: int,  # noqa: ANN001
    request_id: str,
) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(
        transaction=to_transaction(transaction),
        model_name=model,
        model_version=version,
        top_reasons=top_reasons,
        request_id=request_id,
    )


def _batch_request(
    transactions,
    model: str,
    version: str,
    top_reasons: int,  # noqa: ANN001
    request_id: str,
) -> scoring_pb2.ScoreBatchRequest:
    return scoring_pb2.ScoreBatchRequest(
        transactions=[to_transaction(t) for t in transactions],
        model_name=model,
        model_version=version,
        top_reasons=top_reasons,
        request_id=request_id,
    )


class _Base:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        max_attempts: int,
        metadata: Metadata,
        max_message_bytes: int,
        api_key: str = "",
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = tuple(metadata) + auth_metadata(api_key)
        self._options = channel_options(max_attempts, max_message_bytes)

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    def _call_metadata(self, metadata: Metadata | None) -> tuple[tuple[str, str], ...]:
        return self._metadata + tuple(metadata or ()) + trace_metadata()


def auth_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """The ``authorization`` metadata carrying an API key (empty without one)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def tls_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: ``ca`` to trust (default: system roots),
    ``cert``/``key`` to present a client certificate (mutual TLS)."""

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def connection_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``api_key`` and ``credentials`` from RISKWIRE_API_KEY and RISKWIRE_TLS_CA /
    RISKWIRE_TLS_CERT / RISKWIRE_TLS_KEY (TLS when any is set), for the CLI."""
    environ = os.environ if environ is None else environ
    ca, cert, key = (environ.get(f"RISKWIRE_TLS_{n}", "") for n in ("CA", "CERT", "KEY"))
    credentials = tls_credentials(ca, cert, key) if ca or cert else None
    return {"api_key": environ.get("RISKWIRE_API_KEY", ""), "credentials": credentials}


class RiskwireClient(_Base):
    """Synchronous client; thread-safe, one channel for all calls."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = 1.0,
        max_attempts: int = 3,
        metadata: Metadata = (),
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
        api_key: str = "",
    ) -> None:
        super().__init__(
            target,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            metadata=metadata,
            max_message_bytes=max_message_bytes,
            api_key=api_key,
        )
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=self._options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=self._options)
        self._stub = scoring_pb2_grpc.ScoringStub(self.channel)

    def score(
        self,
        transaction: Mapping[str, Any] | scoring_pb2.Transaction,
        *,
        model: str = "",
        version: str = "",
        top_reasons: int = 0,
        request_id: str = "",
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
    ) -> ScoreResult:
        """Score one transaction; raises grpc.RpcError on failure."""
        request = _score_request(transaction, model, version, top_reasons, request_id)
        response = self._stub.Score(
            request, timeout=self._timeout(timeout_s), metadata=self._call_metadata(metadata)
        )
        return from_response(response)

    def score_batch(
        self,
        transactions: Iterable[Mapping[str, Any]],
        *,
        model: str = "",
        version: str = "",
        top_reasons: int = 0,
        request_id: str = "",
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[ScoreResult]:
        """Score many transactions in one call; failed items carry ``error``."""
        request = _batch_request(transactions, model, version, top_reasons, request_id)
        response = self._stub.ScoreBatch(
            request, timeout=self._timeout(timeout_s), metadata=self._call_metadata(metadata)
        )
        return [from_response(r, response.request_id) for r in response.results]

    def score_stream(
        self,
        transactions: Iterable[Mapping[str, Any]],
        *,
        model: str = "",
        top_reasons: int = 0,
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
    ) -> Iterator[ScoreResult]:
        """Stream transactions; yields one result per transaction, in order."""
        requests = (_score_request(t, model, "", top_reasons, "") for t in transactions)
        for response in self._stub.ScoreStream(
            requests, timeout=timeout_s, metadata=self._call_metadata(metadata)
        ):
            yield from_response(response)

    def feedback(
        self,
        outcomes: Iterable[Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
    ) -> int:
        """Send delayed labels (see :func:`to_outcome`); returns how many were stored."""
        request = scoring_pb2.FeedbackRequest(outcomes=[to_outcome(o) for o in outcomes])
        response = self._stub.Feedback(
            request, timeout=self._timeout(timeout_s), metadata=self._call_metadata(metadata)
        )
        return response.stored

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> RiskwireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRiskwireClient(_Base):
    """asyncio client (grpc.aio); create and use it inside a running event loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = 1.0,
        max_attempts: int = 3,
        metadata: Metadata = (),
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
        api_key: str = "",
    ) -> None:
        super().__init__(
            target,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            metadata=metadata,
            max_message_bytes=max_message_bytes,
            api_key=api_key,
        )
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=self._options)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=self._options)
        self._stub = scoring_pb2_grpc.ScoringStub(self.channel)

    async def score(
        self,
        transaction: Mapping[str, Any] | scoring_pb2.Transaction,
        *,
        model: str = "",
        version: str = "",
        top_reasons: int = 0,
        request_id: str = "",
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
    ) -> ScoreResult:
        """Score one transaction; raises grpc.aio.AioRpcError on failure."""
        request = _score_request(transaction, model, version, top_reasons, request_id)
        response = await self._stub.Score(
            request, timeout=self._timeout(timeout_s), metadata=self._call_metadata(metadata)
        )
        return from_response(response)

    async def score_batch(
        self,
        transactions: Iterable[Mapping[str, Any]],
        *,
        model: str = "",
        version: str = "",
        top_reasons: int = 0,
        request_id: str = "",
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[ScoreResult]:
        """Score many transactions in one call."""
        request = _batch_request(transactions, model, version, top_reasons, request_id)
        response = await self._stub.ScoreBatch(
            request, timeout=self._timeout(timeout_s), metadata=self._call_metadata(metadata)
        )
        return [from_response(r, response.request_id) for r in response.results]

    async def score_stream(
        self,
        transactions: Iterable[Mapping[str, Any]],
        *,
        model: str = "",
        top_reasons: int = 0,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[ScoreResult]:
        """Stream transactions; yields one result per transaction, in order."""
        requests = (_score_request(t, model, "", top_reasons, "") for t in transactions)
        call = self._stub.ScoreStream(iter(requests), metadata=self._call_metadata(metadata))
        async for response in call:
            yield from_response(response)

    async def feedback(
        self,
        outcomes: Iterable[Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
    ) -> int:
        """Send delayed labels (see :func:`to_outcome`); returns how many were stored."""
        request = scoring_pb2.FeedbackRequest(outcomes=[to_outcome(o) for o in outcomes])
        response = await self._stub.Feedback(
            request, timeout=self._timeout(timeout_s), metadata=self._call_metadata(metadata)
        )
        return response.stored

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncRiskwireClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
