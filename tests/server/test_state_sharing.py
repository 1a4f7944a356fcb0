"""Per-card state is one sequence across workers and restarts: online == offline, exactly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from riskwire.kernels.encoding import encode_columns
from riskwire.kernels.features import compute_features_offline
from riskwire.protos import scoring_pb2, scoring_pb2_grpc

pytestmark = pytest.mark.timeout(300)

T0 = 1_767_225_600_000 + 8 * 3_600_000  # 2026-01-01T08:00Z


def card_history(card_id: str, n: int, start_ms: int = T0) -> list[scoring_pb2.Transaction]:
    """``n`` varied payments of one card at increasing, explicit event times."""
    merchants = ("m-00001", "m-00002", "m-00003", "m-00777")
    channels = ("pos", "ecommerce", "contactless", "atm", "moto")
    countries = ("DE", "DE", "FR", "US", "RU")
    history, t = [], start_ms
    for i in range(n):
        t += (37 + 613 * (i % 5)) * 1_000 + (i % 3) * 3_600_000
        history.append(
            scoring_pb2.Transaction(
                transaction_id=f"{card_id}-{i}",
                card_id=card_id,
                merchant_id=merchants[i % len(merchants)],
                mcc=(5411, 5732, 5812, 6011, 4829)[i % 5],
                amount=round(3.5 + 17.25 * ((i * 7) % 11), 2),
                currency=("EUR", "EUR", "USD", "RUB")[i % 4],
                country=countries[i % len(countries)],
                card_country="DE",
                channel=channels[i % len(channels)],
                event_time_ms=t,
            )
        )
    return history


def offline_probabilities(forest, history: list[scoring_pb2.Transaction]) -> np.ndarray:
    """The build pipeline's view: one offline feature pass, then the package forest."""
    names = (
        "card_id", "merchant_id", "mcc", "amount", "currency", "country", "card_country",
        "channel",
    )  # fmt: skip
    columns: dict[str, list] = {name: [getattr(t, name) for t in history] for name in names}
    columns["event_time"] = [t.event_time_ms for t in history]
    features, _ = compute_features_offline(encode_columns(columns))
    return forest.predict(features)


@pytest.fixture
def worker_channels(server) -> Iterator[dict[int, grpc.Channel]]:
    """A channel to each of the shared server's two workers."""
    assert len(server.worker_pids()) == 2
    channels = server.connect_each_worker()
    yield channels
    for channel in channels.values():
        channel.close()


def test_alternating_workers_match_offline_pass(server, worker_channels, forest) -> None:
    """One card's payments alternate between workers; served == offline probabilities."""
    pids = sorted(worker_channels)
    stubs = [scoring_pb2_grpc.ScoringStub(worker_channels[pid]) for pid in pids]
    history = card_history(f"card-{uuid.uuid4().hex}", 14)
    served, hit = [], []
    for i, transaction in enumerate(history):
        response = stubs[i % 2].Score(scoring_pb2.ScoreRequest(transaction=transaction), timeout=10)
        served.append(response.probability)
        hit.append(server.worker_of(response.request_id))
    assert hit == [pids[i % 2] for i in range(len(history))]
    np.testing.assert_allclose(served, offline_probabilities(forest, history), rtol=0, atol=1e-12)


def test_interleaved_cards_batches_and_singles_match_offline(worker_channels, forest) -> None:
    """Two cards interleaved, ScoreBatch on one worker and Score on the other."""
    stubs = [scoring_pb2_grpc.ScoringStub(c) for _, c in sorted(worker_channels.items())]
    a = card_history(f"card-{uuid.uuid4().hex}", 9)
    b = card_history(f"card-{uuid.uuid4().hex}", 9, start_ms=T0 + 17_000)
    merged = sorted(a + b, key=lambda t: t.event_time_ms)
    served: dict[str, float] = {}
    for start in range(0, len(merged), 3):
        chunk = merged[start : start + 3]
        if (start // 3) % 2 == 0:
            response = stubs[0].ScoreBatch(
                scoring_pb2.ScoreBatchRequest(transactions=chunk), timeout=10
            )
            served.update({r.transaction_id: r.probability for r in response.results})
        else:
            for transaction in chunk:
                response = stubs[1].Score(
                    scoring_pb2.ScoreRequest(transaction=transaction), timeout=10
                )
                served[response.transaction_id] = response.probability
    for history in (a, b):
        got = [served[t.transaction_id] for t in history]
        np.testing.assert_allclose(got, offline_probabilities(forest, history), rtol=0, atol=1e-12)


def test_state_survives_restart_through_snapshot(
    start_server, models_dir, forest, tmp_path
) -> None:
    """SIGTERM writes the snapshot (exit 0); a new server restores it and continues."""
    snapshot = tmp_path / "state" / "cards.snapshot"
    history = card_history(f"card-{uuid.uuid4().hex}", 8)
    expected = offline_probabilities(forest, history)

    first = start_server(models_dir, snapshot=snapshot)
    with grpc.insecure_channel(first.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        before = [
            stub.Score(scoring_pb2.ScoreRequest(transaction=t), timeout=10).probability
            for t in history[:-1]
        ]
    np.testing.assert_allclose(before, expected[:-1], rtol=0, atol=1e-12)
    assert first.stop() == 0, first.log_tail()
    assert snapshot.is_file() and snapshot.stat().st_size > 0

    second = start_server(models_dir, snapshot=snapshot)
    assert "restored card state" in second.log()
    with grpc.insecure_channel(second.target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        last = stub.Score(scoring_pb2.ScoreRequest(transaction=history[-1]), timeout=10)
    assert last.probability == pytest.approx(expected[-1], rel=0, abs=1e-12)
    fresh_start = offline_probabilities(forest, history[-1:])[0]
    assert last.probability != fresh_start, "test data: history must change the last score"
