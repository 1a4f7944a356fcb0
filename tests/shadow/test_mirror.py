"""The per-worker mirror, its configuration, the segment writer and the label store."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskwire.kernels.schema import NUM_FEATURES
from riskwire.shadow.compare import PairStats
from riskwire.shadow.config import (
    ShadowConfig,
    ShadowConfigError,
    parse_filter,
    read_control,
    write_control,
)
from riskwire.shadow.labels import LabelStore
from riskwire.shadow.mirror import MirrorSettings, ShadowMirror
from riskwire.shadow.records import (
    RECORD_SCHEMA,
    SegmentWriter,
    join_labels,
    read_labels,
    read_records,
)

FILTER_VALUES = ("ecommerce", "DE", "DE", "EUR", 5411, 120.0)


class FakeTarget:
    """A shadow that scores p + 0.01, raises, or blocks until released."""

    name, version = "fraud", "1"
    review_threshold, decline_threshold = 0.3, 0.7

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.release = threading.Event()
        self.entered = threading.Event()
        self.rows = 0

    def score(self, features: np.ndarray) -> np.ndarray:
        self.rows += len(features)
        if self.mode == "raise":
            raise RuntimeError("shadow broke")
        if self.mode == "block":
            self.entered.set()
            self.release.wait(10)
        return np.clip(features[:, 0] + 0.01, 0.0, 1.0)

    def close(self) -> None:
        self.release.set()


def make_mirror(tmp_path: Path, target: FakeTarget, **overrides) -> ShadowMirror:
    settings = MirrorSettings(
        records_dir=tmp_path / "records",
        stats_path=tmp_path / "stats" / "worker-0.json",
        flush_seconds=0.05,
        **overrides,
    )
    config = ShadowConfig(enabled=True, version="1")
    return ShadowMirror(0, settings, lambda name, version: target, "fraud", config)


def offer(mirror: ShadowMirror, i: int, probability: float, *, values=FILTER_VALUES) -> None:
    features = np.full(NUM_FEATURES, probability)
    decision = "decline" if probability >= 0.7 else "review" if probability >= 0.3 else "approve"
    mirror.offer_one(
        "fraud", "2", f"r{i}", f"t{i}", 1_700_000_000_000 + i, 10 + i,
        probability, decision, 50.0, features, values,
    )  # fmt: skip


def test_every_offer_becomes_one_record_and_the_stats_match_the_records(tmp_path) -> None:
    target = FakeTarget()
    mirror = make_mirror(tmp_path, target)
    mirror.start()
    rng = np.random.default_rng(0)
    probabilities = rng.random(500)
    for i, p in enumerate(probabilities):
        offer(mirror, i, float(p))
    mirror.stop()
    table = read_records(tmp_path)
    assert sorted(table["request_id"].to_pylist()) == sorted(f"r{i}" for i in range(500))
    assert table["entity_hash"].to_pylist()[:1] and "card_id" not in table.column_names
    shadow = table["shadow_probability"].to_numpy()
    np.testing.assert_allclose(
        shadow, np.clip(table["primary_probability"].to_numpy() + 0.01, 0, 1)
    )
    expected = PairStats.from_arrays(
        table["primary_probability"].to_numpy(),
        shadow,
        table["primary_decision"].to_pylist(),
        table["shadow_decision"].to_pylist(),
    ).summary()
    published = json.loads((tmp_path / "stats" / "worker-0.json").read_text())
    online = PairStats.from_dict(published["pairs"][0]["stats"]).summary()
    assert online["mirrored"] == 500 and online["flips"] == expected["flips"]
    for key in ("agreement_rate", "mean_abs_delta", "max_abs_delta", "correlation", "psi"):
        assert online[key] == pytest.approx(expected[key], rel=1e-9), key
    assert published["records_written"] == 500


def test_a_failing_shadow_is_recorded_as_failures(tmp_path) -> None:
    mirror = make_mirror(tmp_path, FakeTarget("raise"))
    mirror.start()
    for i in range(20):
        offer(mirror, i, 0.5)
    mirror.stop()
    table = read_records(tmp_path)
    assert table.num_rows == 20
    assert set(table["shadow_error"].to_pylist()) == {"RuntimeError: shadow broke"}
    assert table["shadow_probability"].null_count == 20


def test_a_hung_shadow_never_blocks_the_caller_and_full_queues_drop(tmp_path) -> None:
    target = FakeTarget("block")
    mirror = make_mirror(tmp_path, target, queue_size=10, batch_rows=1)
    mirror.start()
    offer(mirror, 0, 0.5)
    assert target.entered.wait(5)  # the scorer thread is now stuck inside the shadow
    for i in range(1, 101):  # every call returns although the shadow never answers
        offer(mirror, i, 0.5)
    assert mirror.queued() == 10  # the row being scored holds its slot until it is done
    target.release.set()
    mirror.stop()
    stats = json.loads((tmp_path / "stats" / "worker-0.json").read_text())["pairs"][0]["stats"]
    assert stats["dropped"] == 91 and stats["mirrored"] == 10


def test_sampling_and_filter_choose_what_is_mirrored(tmp_path) -> None:
    mirror = make_mirror(tmp_path, FakeTarget())
    mirror._apply(ShadowConfig(enabled=True, version="1", filter="channel=pos; amount>=100"))
    offer(mirror, 0, 0.1)  # ecommerce: filtered out
    offer(mirror, 1, 0.1, values=("pos", "DE", "DE", "EUR", 5411, 99.0))  # too small
    offer(mirror, 2, 0.1, values=("pos", "DE", "DE", "EUR", 5411, 100.0))
    assert mirror.queued() == 1
    mirror._apply(ShadowConfig(enabled=True, version="1", rate_percent=0.0))
    assert not any(mirror.sampled() for _ in range(1000))
    mirror._apply(ShadowConfig(enabled=True, version="1", rate_percent=25.0))
    assert 150 < sum(mirror.sampled() for _ in range(1000)) < 350
    mirror._apply(ShadowConfig(enabled=False))
    assert not mirror.active  # callers check `active` before offering


def test_a_target_that_cannot_load_leaves_the_mirror_inactive(tmp_path) -> None:
    def broken(name: str, version: str):  # noqa: ANN202
        raise FileNotFoundError("no such package")

    mirror = ShadowMirror(
        0,
        MirrorSettings(records_dir=tmp_path / "r", stats_path=tmp_path / "s.json"),
        broken,
        "fraud",
        ShadowConfig(enabled=True, version="7"),
    )
    assert not mirror.active
    assert "no such package" in mirror.target_error


def test_control_file_generations_grow(tmp_path) -> None:
    path = tmp_path / "shadow.json"
    assert read_control(path) is None
    first = write_control(path, ShadowConfig(enabled=True, version="1"))
    second = write_control(path, ShadowConfig(enabled=False))
    assert (first.generation, second.generation) == (1, 2)
    assert read_control(path) == second


@pytest.mark.parametrize(
    ("expression", "request_values", "wanted"),
    [
        ("channel=ecommerce,moto", ("moto", "DE", "DE", "EUR", 1, 1.0), True),
        ("channel=ecommerce,moto", ("pos", "DE", "DE", "EUR", 1, 1.0), False),
        ("country!=NG; currency=EUR", ("pos", "NG", "DE", "EUR", 1, 1.0), False),
        ("mcc=6011; amount>500", ("atm", "DE", "DE", "EUR", 6011, 600.0), True),
        ("amount<=10", ("atm", "DE", "DE", "EUR", 6011, 10.5), False),
    ],
)
def test_filters(expression: str, request_values: tuple, wanted: bool) -> None:
    check = parse_filter(expression)
    assert check is not None and check(*request_values) is wanted


@pytest.mark.parametrize(
    ("expression", "complaint"),
    [
        ("colour=red", "not one of"),
        ("channel>3", "numeric field"),
        ("amount=abc", "not a number"),
        ("channel", "expected field=value"),
    ],
)
def test_bad_filters_are_explained(expression: str, complaint: str) -> None:
    with pytest.raises(ShadowConfigError, match=complaint):
        parse_filter(expression)


@pytest.mark.parametrize(
    "config",
    [
        ShadowConfig(enabled=True, version="../../etc"),
        ShadowConfig(enabled=True, version="1", rate_percent=101),
        ShadowConfig(enabled=True),
        ShadowConfig(enabled=True, endpoint="no-port"),
    ],
)
def test_bad_configs_are_refused(config: ShadowConfig) -> None:
    with pytest.raises(ShadowConfigError):
        config.validate()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=60),
    st.lists(st.floats(0, 1), min_size=1, max_size=60),
)
def test_merged_stats_equal_stats_of_the_union(left: list[float], right: list[float]) -> None:
    def stats(values: list[float]) -> PairStats:
        p = np.array(values)
        s = np.clip(p * 0.9 + 0.05, 0, 1)
        decide = lambda x: ["decline" if v >= 0.7 else "approve" for v in x]  # noqa: E731
        return PairStats.from_arrays(p, s, decide(p), decide(s))

    merged = PairStats.from_dict(stats(left).to_dict())  # through the worker hand-off form
    merged.merge(PairStats.from_dict(stats(right).to_dict()))
    union = stats(left + right)
    for name in ("mirrored", "failed", "scored", "agree"):
        assert getattr(merged, name) == getattr(union, name)
    np.testing.assert_array_equal(merged.flips, union.flips)
    np.testing.assert_array_equal(merged.primary_hist, union.primary_hist)
    np.testing.assert_array_equal(merged.shadow_hist, union.shadow_hist)
    assert merged.max_abs_delta == union.max_abs_delta
    for name in ("sum_abs_delta", "sum_p", "sum_s", "sum_pp", "sum_ss", "sum_ps"):
        assert getattr(merged, name) == pytest.approx(getattr(union, name), abs=1e-9)


def test_segment_writer_group_commit_and_atomic_files(tmp_path) -> None:
    assert SegmentWriter(tmp_path / "records", RECORD_SCHEMA, worker=3).flush() is None
    store = LabelStore(tmp_path, worker=1)
    results = []

    def send(i: int) -> None:
        results.append(store.store([(f"r{i}", "", i % 2, 1_700_000_000_000 + i)]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels = read_labels(tmp_path)  # every call returned only after its label was on disk
    assert sorted(labels["request_id"].to_pylist()) == sorted(f"r{i}" for i in range(16))
    assert len(list((tmp_path / "labels").glob("part-*.parquet"))) <= 16
    assert not list((tmp_path / "labels").glob(".*"))


def test_join_takes_the_latest_label_by_request_then_transaction(tmp_path) -> None:
    store = LabelStore(tmp_path, worker=0)
    store.store([("r1", "", 0, 1000), ("r1", "", 1, 2000), ("", "t2", 1, 1000)])
    mirror = make_mirror(tmp_path, FakeTarget())
    mirror.start()
    offer(mirror, 1, 0.2)
    offer(mirror, 2, 0.2)
    offer(mirror, 3, 0.2)
    mirror.stop()
    joined = join_labels(read_records(tmp_path), read_labels(tmp_path))
    labels = dict(zip(joined["request_id"].to_pylist(), joined["label"].to_pylist(), strict=True))
    assert labels == {"r1": 1, "r2": 1, "r3": None}


def test_records_carry_the_callers_client_id(tmp_path) -> None:
    """The authenticated client id of each mirrored call lands in its record (null for
    calls without one), single calls and batches alike."""
    mirror = make_mirror(tmp_path, FakeTarget())
    mirror.start()
    features = np.full(NUM_FEATURES, 0.5)
    mirror.offer_one("fraud", "2", "single-auth", "t", 1_700_000_000_000, 7, 0.5, "review",
                     50.0, features, FILTER_VALUES, None, "payments")  # fmt: skip
    mirror.offer_one("fraud", "2", "single-anon", "t", 1_700_000_000_000, 8, 0.5, "review",
                     50.0, features, FILTER_VALUES)  # fmt: skip
    columns = {name: [value, value] for name, value in zip(
        ("channel", "country", "card_country", "currency", "mcc", "amount"), FILTER_VALUES,
        strict=True)}  # fmt: skip
    mirror.offer_batch(
        "fraud", "2", "batch", None, np.array([1, 2]), np.array([3, 4], np.uint64),
        np.array([0.1, 0.9]), np.array(["approve", "decline"], dtype=object), 40.0,
        np.full((2, NUM_FEATURES), 0.2), columns, np.array([0, 1]), None, "checkout",
    )  # fmt: skip
    mirror.stop()
    table = read_records(tmp_path)
    clients = dict(zip(table["request_id"].to_pylist(), table["client_id"].to_pylist(),
                       strict=True))  # fmt: skip
    assert clients == {"single-auth": "payments", "single-anon": None,
                       "batch/0": "checkout", "batch/1": "checkout"}  # fmt: skip
