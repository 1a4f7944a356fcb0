"""LocalScorer (edge mode) validates like the server's Scoring API."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from riskwire.clients.local import LocalScorer
from riskwire.server.errors import InvalidInputError, ModelNotFoundError

ROW = {
    "transaction_id": "local-1",
    "card_id": "card-local-1",
    "merchant_id": "m-1",
    "mcc": 5411,
    "amount": 15.0,
    "currency": "EUR",
    "country": "DE",
    "card_country": "DE",
    "channel": "pos",
    "event_time_ms": 1_767_225_600_000,
}


@pytest.fixture
def scorer(models_dir: Path) -> LocalScorer:
    """A LocalScorer with empty card state."""
    return LocalScorer(models_dir)


def test_single_equals_batch_on_fresh_state(models_dir: Path) -> None:
    """score() and score_batch() agree on a first payment of a card."""
    single = LocalScorer(models_dir).score(ROW)
    (batch,) = LocalScorer(models_dir).score_batch([ROW])
    assert single.probability == batch.probability and single.decision == batch.decision
    assert single.transaction_id == batch.transaction_id == "local-1"


def test_batch_item_error_names_field(scorer: LocalScorer) -> None:
    """An invalid row gets an INVALID_ARGUMENT item error; the others score."""
    results = scorer.score_batch([ROW, {**ROW, "amount": -1.0}, {**ROW, "card_id": "c2"}])
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].error[0] == 3 and "amount" in results[1].error[1]
    assert math.isnan(results[1].probability) and results[1].decision == ""


def test_unknown_model_and_bad_top_reasons(scorer: LocalScorer) -> None:
    """Same domain errors as the server: ModelNotFoundError, InvalidInputError."""
    with pytest.raises(ModelNotFoundError):
        scorer.score(ROW, model="nope")
    with pytest.raises(InvalidInputError, match="top_reasons"):
        scorer.score(ROW, top_reasons=11)


@pytest.mark.parametrize("k", [11, -1])
def test_batch_top_reasons_validated_like_the_server(scorer: LocalScorer, k: int) -> None:
    """score_batch(top_reasons=k) outside 0..10 is an InvalidInputError, as on the server."""
    with pytest.raises(InvalidInputError, match="top_reasons"):
        scorer.score_batch([ROW], top_reasons=k)
