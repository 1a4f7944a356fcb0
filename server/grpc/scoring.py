"""riskwire.v1.Scoring servicer: Score, ScoreBatch, ScoreStream."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import grpc

from riskwire.protos import scoring_pb2, scoring_pb2_grpc

from ..dataplane import BATCH_COLUMNS, DataPlane, ScoreOutcome
from ..errors import InvalidInputError
from .status import check_deadline, item_error, unary

DECISIONS = {
    "approve": scoring_pb2.DECISION_APPROVE,
    "review": scoring_pb2.DECISION_REVIEW,
    "decline": scoring_pb2.DECISION_DECLINE,
    "": scoring_pb2.DECISION_UNSPECIFIED,
}
_Reason = scoring_pb2.ReasonCode
_Response = scoring_pb2.ScoreResponse


class RequestIds:
    """Cheap unique request ids: worker-unique prefix + a counter."""

    def __init__(self) -> None:
        self._prefix = f"{os.getpid():x}-{int.from_bytes(os.urandom(3), 'big'):06x}-"
        self._counter = itertools.count(1)

    def next(self) -> str:
        """A new id (thread-safe: itertools.count is atomic under the GIL)."""
        return f"{self._prefix}{next(self._counter):x}"


def transaction_columns(transactions) -> dict[str, list]:  # noqa: ANN001 - repeated field
    """Columns of a repeated Transaction field, as the dataplane takes them."""
    return {name: [getattr(t, name) for t in transactions] for name in BATCH_COLUMNS}


def _reason_messages(reasons: list[tuple[str, float, float]]) -> list:
    return [_Reason(feature=f, contribution=c, value=v) for f, c, v in reasons]


class ScoringServicer(scoring_pb2_grpc.ScoringServicer):
    """The typed fraud API on top of :class:`DataPlane`."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane
        self._ids = RequestIds()

    def _score(self, request: scoring_pb2.ScoreRequest) -> _Response:
        dataplane = self._dataplane
        model = dataplane.model(request.model_name, request.model_version)
        t = request.transaction
        outcome: ScoreOutcome = dataplane.score_one(
            model,
            card_id=t.card_id,
            merchant_id=t.merchant_id,
            mcc=t.mcc,
            amount=t.amount,
            currency=t.currency,
            country=t.country,
            card_country=t.card_country,
            channel=t.channel,
            event_time_ms=t.event_time_ms,
            top_reasons=dataplane.top_reasons_wanted(request.top_reasons),
        )
        return _Response(
            request_id=request.request_id or self._ids.next(),
            transaction_id=t.transaction_id,
            probability=outcome.probability,
            decision=DECISIONS[outcome.decision],
            model_name=model.name,
            model_version=model.version,
            reasons=_reason_messages(outcome.reasons),
        )

    @unary
    def Score(self, request: scoring_pb2.ScoreRequest, context: grpc.ServicerContext):
        if not request.HasField("transaction"):
            raise InvalidInputError("transaction: required field is missing", field="transaction")
        return self._score(request)

    @unary
    def ScoreBatch(self, request: scoring_pb2.ScoreBatchRequest, context: grpc.ServicerContext):
        dataplane = self._dataplane
        model = dataplane.model(request.model_name, request.model_version)
        top = dataplane.top_reasons_wanted(request.top_reasons, default=0)
        transactions = request.transactions
        outcome = dataplane.score_batch(model, transaction_columns(transactions), top_reasons=top)
        results = []
        for i, t in enumerate(transactions):
            error = outcome.errors.get(i)
            if error is not None:
                code, message = item_error(error)
                results.append(
                    _Response(
                        transaction_id=t.transaction_id,
                        error=scoring_pb2.ItemError(code=code, message=message),
                    )
                )
                continue
            results.append(
                _Response(
                    transaction_id=t.transaction_id,
                    probability=outcome.probabilities[i],
                    decision=DECISIONS[outcome.decisions[i]],
                    model_name=model.name,
                    model_version=model.version,
                    reasons=_reason_messages(outcome.reasons[i]) if outcome.reasons else (),
                )
            )
        return scoring_pb2.ScoreBatchResponse(
            request_id=request.request_id or self._ids.next(),
            model_name=model.name,
            model_version=model.version,
            results=results,
        )

    def ScoreStream(
        self, request_iterator: Iterator[scoring_pb2.ScoreRequest], context: grpc.ServicerContext
    ) -> Iterator[_Response]:
        for request in request_iterator:
            try:
                check_deadline(context)
                if not request.HasField("transaction"):
                    raise InvalidInputError("transaction: required field is missing")
                yield self._score(request)
            except Exception as exc:  # noqa: BLE001 - one bad item must not end the stream
                code, message = item_error(exc)
                yield _Response(
                    request_id=request.request_id,
                    transaction_id=request.transaction.transaction_id,
                    error=scoring_pb2.ItemError(code=code, message=message),
                )
