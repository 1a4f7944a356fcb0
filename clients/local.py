"""Edge mode: score in-process from a model package, with the server's own code path.

The same DataPlane, kernels and validation as ``riskwire serve``, with a private card
state table instead of shared memory — for batch jobs, notebooks and devices that
cannot call a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from riskwire.kernels.state import CardStateTable
from riskwire.server.dataplane import BATCH_COLUMNS, DataPlane
from riskwire.server.errors import ServingError
from riskwire.server.registry import ModelRegistry
from riskwire.server.state import LocalCardState

from .client import ScoreResult, to_transaction

_STATUS_NUMBERS = {"INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "INTERNAL": 13}


class LocalScorer:
    """In-process scorer with the client's interface (``score``, ``score_batch``)."""

    def __init__(
        self, models: str | Path, model_name: str = "fraud", *, state_capacity: int = 1 << 16
    ) -> None:
        registry = ModelRegistry(Path(models), model_name)
        if not registry.load_all():
            raise FileNotFoundError(f"no loadable model package under {models}")
        self._dataplane = DataPlane(registry, LocalCardState(CardStateTable.create(state_capacity)))
        self._counter = 0

    def score(
        self,
        transaction: Mapping[str, Any],
        *,
        model: str = "",
        version: str = "",
        top_reasons: int = 0,
        request_id: str = "",
    ) -> ScoreResult:
        """Score one transaction (raises ServingError subclasses on bad input)."""
        message = to_transaction(transaction)
        runtime = self._dataplane.model(model, version)
        outcome = self._dataplane.score_one(
            runtime,
            **{name: getattr(message, name) for name in BATCH_COLUMNS},
            top_reasons=self._dataplane.top_reasons_wanted(top_reasons),
        )
        return ScoreResult(
            request_id=request_id or self._next_id(),
            transaction_id=message.transaction_id,
            probability=outcome.probability,
            decision=outcome.decision,
            model_name=runtime.name,
            model_version=runtime.version,
            reasons=outcome.reasons,
        )

    def score_batch(
        self,
        transactions: Iterable[Mapping[str, Any]],
        *,
        model: str = "",
        version: str = "",
        top_reasons: int = 0,
    ) -> list[ScoreResult]:
        """Score transactions in order; invalid ones come back with ``error`` set."""
        messages = [to_transaction(t) for t in transactions]
        runtime = self._dataplane.model(model, version)
        columns = {name: [getattr(m, name) for m in messages] for name in BATCH_COLUMNS}
        top = self._dataplane.top_reasons_wanted(top_reasons, default=0)
        outcome = self._dataplane.score_batch(runtime, columns, top_reasons=top)
        request_id = self._next_id()
        results = []
        for i, message in enumerate(messages):
            error = outcome.errors.get(i)
            results.append(
                ScoreResult(
                    request_id=request_id,
                    transaction_id=message.transaction_id,
                    probability=float(outcome.probabilities[i]),
                    decision=outcome.decisions[i],
                    model_name=runtime.name,
                    model_version=runtime.version,
                    reasons=outcome.reasons[i] if outcome.reasons else [],
                    error=_error_tuple(error) if error else None,
                )
            )
        return results

    def _next_id(self) -> str:
        self._counter += 1
        return f"local-{self._counter:x}"


def _error_tuple(error: ServingError) -> tuple[int, str]:
    return _STATUS_NUMBERS.get(error.code.value, 13), str(error)
