"""Transport-neutral scoring: validate → encode → features (shared state) → forest → decide.

The gRPC servicers convert protobuf messages to the plain values and columns taken
here and convert the results back; nothing in this module knows about protobuf.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from riskwire.kernels import encoding
from riskwire.kernels.encoding import TransactionArrays, encode_columns
from riskwire.kernels.schema import NUM_FEATURES

from .errors import InvalidInputError, OutputValidationError
from .registry import ModelRegistry, ModelRuntime
from .request_log import CALL, call_ids
from .traffic import canary_buckets
from .validation import OUTPUT_INVALID, ValidationPolicy

MAX_TOP_REASONS = 10
# Response flag of rows scored without per-card history (the state store was unavailable
# and redis_on_failure = "degrade").
STATE_UNAVAILABLE = "state_unavailable"
# Raw fields the validation kernels check (quoted back in rejection messages).
CHECKED_FIELDS = ("amount", "mcc", "country", "card_country", "currency", "channel")
# Columns a batch must carry (transaction_id is optional and only echoed back).
BATCH_COLUMNS = (
    "card_id", "merchant_id", "mcc", "amount", "currency", "country", "card_country",
    "channel", "event_time_ms",
)  # fmt: skip


class Mirror(Protocol):
    """Where scored requests are offered for shadow scoring (riskwire.shadow.mirror)."""

    active: bool

    def sampled(self) -> bool: ...

    def offer_one(self, *args: object) -> None: ...

    def offer_batch(self, *args: object) -> None: ...


class Monitor(Protocol):
    """Drift sketches of scored requests (riskwire.server.monitoring.recorder)."""

    def record_one(self, *args: object) -> None: ...

    def record_many(self, *args: object) -> None: ...


class PredictionSink(Protocol):
    """The prediction log (riskwire.server.monitoring.predictions)."""

    def sampled(self) -> bool: ...

    def add_one(self, *args: object) -> None: ...

    def add_many(self, *args: object) -> None: ...


class ReviewQueueSink(Protocol):
    """Cases for human review (riskwire.server.review.ReviewSink)."""

    def wants(self, decision: str) -> float: ...

    def wants_many(self, decisions: np.ndarray) -> np.ndarray: ...

    def offer(self, *args: object) -> None: ...


class FeatureState(Protocol):
    """Per-card state that turns encoded transactions into feature rows."""

    def update(self, tx: TransactionArrays, out: np.ndarray) -> np.ndarray: ...

    def peek(self, tx: TransactionArrays, out: np.ndarray) -> np.ndarray: ...


@dataclass(slots=True)
class ScoreOutcome:
    """Result of one transaction."""

    probability: float
    decision: str
    reasons: list[tuple[str, float, float]]  # (feature, contribution, value)
    flags: tuple[str, ...] = ()  # validation findings under the "flag" policy
    model: ModelRuntime | None = None  # the version that answered


@dataclass(slots=True)
class BatchOutcome:
    """Results of a batch; rows listed in ``errors`` have no score (probability NaN)."""

    probabilities: np.ndarray
    decisions: np.ndarray  # object array of "approve" / "review" / "decline" / ""
    reasons: list[list[tuple[str, float, float]]] | None
    errors: dict[int, InvalidInputError]
    flags: list[tuple[str, ...]]  # per row
    versions: np.ndarray | None = None  # per row, when a canary answered some rows
    model: ModelRuntime | None = None  # the version that answered (all rows)


class _Scratch(threading.local):
    """Per-thread one-row buffers so the single-transaction path allocates nothing."""

    def __init__(self) -> None:
        self.tx = TransactionArrays(
            card_key=np.zeros(1, np.uint64),
            merchant_key=np.zeros(1, np.uint64),
            event_time_ms=np.zeros(1, np.int64),
            amount=np.zeros(1, np.float64),
            mcc=np.zeros(1, np.int32),
            country=np.zeros(1, np.int32),
            card_country=np.zeros(1, np.int32),
            currency=np.zeros(1, np.int32),
            channel=np.zeros(1, np.int32),
        )
        self.features = np.zeros((1, NUM_FEATURES), np.float64)
        self.top_index = np.zeros(MAX_TOP_REASONS, np.int64)
        self.top_value = np.zeros(MAX_TOP_REASONS, np.float64)
        self.contributions = np.zeros(NUM_FEATURES + 1, np.float64)


def _mirrored_call_ids() -> tuple:
    """The span ids of the call being served, chosen now (it is being mirrored: its
    shadow span links to them) and kept for its server span."""
    ids = CALL.ids
    if ids is None:
        ids = CALL.ids = call_ids(CALL.traceparent)
    return ids


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class DataPlane:
    """Scores transactions with a model from the registry and the shared card state."""

    def __init__(
        self,
        registry: ModelRegistry,
        state: FeatureState,
        *,
        default_top_reasons: int = 3,
        max_batch_rows: int = 100_000,
        clock_ms: Callable[[], int] = _now_ms,
        mirror: Mirror | None = None,
        policy: ValidationPolicy | None = None,
        monitor: Monitor | None = None,
        predictions: PredictionSink | None = None,
        review: ReviewQueueSink | None = None,
    ) -> None:
        self.registry = registry
        self.predictions = predictions
        self.review = review
        self.mirror = mirror
        self.policy = policy
        self.monitor = monitor
        self._state = state
        # Stores that can fail (Redis) say when a call was scored without card state.
        self._took_degraded: Callable[[], bool] | None = getattr(state, "took_degraded", None)
        self._default_top_reasons = default_top_reasons
        self.max_batch_rows = max_batch_rows
        self._clock_ms = clock_ms
        self._scratch = _Scratch()
        # Stage clock readings for trace span events (set when tracing is on).
        self.trace_stages = False

    def model(self, name: str = "", version: str = "") -> ModelRuntime:
        """The model a request asks for (raises ModelNotFoundError)."""
        return self.registry.get(name, version)

    def top_reasons_wanted(self, requested: int, *, default: int | None = None) -> int:
        """Validated reason count: 0 → default, at most MAX_TOP_REASONS."""
        if requested < 0 or requested > MAX_TOP_REASONS:
            raise InvalidInputError(
                f"top_reasons: expected 0..{MAX_TOP_REASONS}, got {requested}",
                field="top_reasons",
            )
        return requested or (self._default_top_reasons if default is None else default)

    def score_one(
        self,
        model: ModelRuntime,
        *,
        card_id: str,
        merchant_id: str,
        mcc: int,
        amount: float,
        currency: str,
        country: str,
        card_country: str,
        channel: str,
        event_time_ms: int,
        top_reasons: int,
        field_prefix: str = "transaction.",
        request_id: str = "",
        transaction_id: str = "",
        route: bool = True,
    ) -> ScoreOutcome:
        """Score one transaction, updating its card's state (``field_prefix`` starts the
        field names in error messages); mirror it to the shadow if one is active."""
        started = time.perf_counter()
        _check_row(card_id, merchant_id, amount, event_time_ms, field_prefix)
        scratch = self._scratch
        tx = scratch.tx
        tx.card_key[0] = card_key = encoding.hash64(card_id)
        if route:  # a canary answers its cards (the call named no version)
            model = self.registry.route(model, card_key)
        CALL.model = model
        tx.merchant_key[0] = encoding.hash64(merchant_id)
        tx.event_time_ms[0] = event_time_ms = event_time_ms or self._clock_ms()
        tx.amount[0] = amount
        tx.mcc[0] = mcc if 0 <= mcc <= encoding.MCC_MAX else encoding.UNKNOWN_CODE
        unknown = encoding.UNKNOWN_CODE  # the codes stay Python ints for the calls below
        tx.country[0] = country_code = encoding.COUNTRY_CODES.get(country, unknown)
        tx.card_country[0] = issuer_code = encoding.COUNTRY_CODES.get(card_country, unknown)
        tx.currency[0] = currency_code = encoding.CURRENCY_CODES.get(currency, unknown)
        tx.channel[0] = channel_code = encoding.CHANNEL_CODES.get(channel, unknown)
        flags: tuple[str, ...] = ()
        policy = self.policy
        if policy is not None:
            mask = model.validation.row(
                amount, mcc, country_code, issuer_code, currency_code, channel_code
            )
            if mask:  # rejects before the card's state is touched
                flags = policy.apply(
                    mask,
                    {"amount": amount, "mcc": mcc, "country": country,
                     "card_country": card_country, "currency": currency, "channel": channel},
                    field_prefix,
                )  # fmt: skip
            else:
                policy.count_clean()
        stages = self.trace_stages
        if stages:
            t_validated = time.perf_counter()
        row = self._state.update(tx, scratch.features)[0]
        took_degraded = self._took_degraded
        if took_degraded is not None and took_degraded():
            flags = (*flags, STATE_UNAVAILABLE)
        if stages:
            t_features = time.perf_counter()
        reasons = []
        if not top_reasons:
            probability = model.forest.predict_row(row)
        else:
            top_index, top_value = scratch.top_index, scratch.top_value
            probability = model.forest.predict_row_reasons(
                row, top_reasons, top_index, top_value, scratch.contributions
            )
            names = model.feature_names
            reasons = [
                (names[j], value, float(row[j]))
                for j, value in zip(
                    top_index[:top_reasons].tolist(), top_value[:top_reasons].tolist(), strict=True
                )
                if j >= 0
            ]
        if not 0.0 <= probability <= 1.0:
            return self._invalid_output(probability, model)
        decision = model.decision(probability)
        if stages:
            t_predicted = time.perf_counter()
        monitor = self.monitor
        if monitor is not None:
            monitor.record_one(
                model.name, model.version, row, issuer_code, probability, bool(flags)
            )
        predictions = self.predictions
        if predictions is not None and predictions.sampled():  # before building its row
            predictions.add_one(
                request_id, transaction_id, self._clock_ms(), model.name, model.version,
                probability, decision, card_key,
                (card_id, merchant_id, mcc, amount, currency, country, card_country, channel,
                 int(event_time_ms)),
                row.tobytes(), flags,
            )  # fmt: skip
        review = self.review
        if review is not None:
            inclusion = review.wants(decision)
            if inclusion:
                review.offer(
                    model.name, model.version, request_id, transaction_id,
                    int(event_time_ms), card_key, probability, decision, inclusion,
                    row.copy(), model.feature_names, reasons, model.forest.top_reasons,
                )  # fmt: skip
        if stages:
            t_recorded = time.perf_counter()
        mirror = self.mirror
        if mirror is not None and mirror.active and mirror.sampled():
            mirror.offer_one(
                model.name,
                model.version,
                request_id,
                transaction_id,
                int(event_time_ms),
                int(card_key),
                probability,
                decision,
                (time.perf_counter() - started) * 1e6,
                row,  # copied into the mirror's ring
                (channel, country, card_country, currency, mcc, amount),
                _mirrored_call_ids() if stages else None,
                CALL.client,
            )
        if stages:
            CALL.stages = (
                started,
                t_validated,
                t_features,
                t_predicted,
                t_recorded,
                time.perf_counter(),
            )
        return ScoreOutcome(probability, decision, reasons, flags, model)

    def _invalid_output(self, probability: float, model: ModelRuntime) -> ScoreOutcome:
        """A probability outside [0, 1]: INTERNAL, or the configured fail-safe decision."""
        message = (
            f"model {model.name} v{model.version} produced probability {probability!r}, "
            "outside [0, 1]"
        )
        policy = self.policy
        if policy is not None:
            policy.output_invalid(message)
            if policy.output_failsafe:
                return ScoreOutcome(math.nan, policy.output_failsafe, [], (OUTPUT_INVALID,), model)
        raise OutputValidationError(message + "; no decision was made")

    def score_batch(
        self,
        model: ModelRuntime,
        columns: Mapping[str, Sequence],
        *,
        top_reasons: int = 0,
        all_or_nothing: bool = False,
        request_id: str = "",
        route: bool = True,
    ) -> BatchOutcome:
        """Score rows in order; invalid rows get an error each and leave the state alone.

        With ``all_or_nothing`` the first invalid row raises InvalidInputError before
        any state is touched (tensor APIs, where a request succeeds or fails whole).
        Scored rows are mirrored to an active shadow as ``<request_id>/<row>``. With
        ``route`` (the call named no version) a canary answers its cards' rows.
        """
        started = time.perf_counter()
        rows = len(columns["amount"])
        if rows > self.max_batch_rows:
            raise InvalidInputError(
                f"batch has {rows} rows; at most {self.max_batch_rows} are accepted per call"
            )
        errors: dict[int, InvalidInputError] = {}
        card_ids, merchant_ids = columns["card_id"], columns["merchant_id"]
        amounts, times = columns["amount"], columns["event_time_ms"]
        for i in range(rows) if _may_have_bad_rows(card_ids, merchant_ids, amounts, times) else ():
            try:
                _check_row(
                    card_ids[i],
                    merchant_ids[i],
                    float(amounts[i]),
                    int(times[i]),
                    f"transactions[{i}].",
                )
            except InvalidInputError as exc:
                errors[i] = exc
        if errors and all_or_nothing:
            raise _whole_request_error(errors)
        valid = np.array([i for i in range(rows) if i not in errors], dtype=np.int64)
        probabilities = np.full(rows, np.nan)
        decisions = np.full(rows, "", dtype=object)
        flags: list[tuple[str, ...]] = [()] * rows
        reasons: list[list[tuple[str, float, float]]] | None = (
            [[] for _ in range(rows)] if top_reasons else None
        )
        if len(valid):
            picked = {name: _take(columns[name], valid, len(errors) > 0) for name in BATCH_COLUMNS}
            event_times = np.asarray(picked.pop("event_time_ms"), dtype=np.int64)
            event_times = np.where(event_times == 0, self._clock_ms(), event_times)
            tx = encode_columns({**picked, "event_time": event_times})
            flagged = np.zeros(len(valid), dtype=np.bool_)
            if self.policy is not None:
                valid, tx, flagged = self._validate_batch(
                    model, columns, valid, tx, picked["mcc"], errors, flags
                )
                if errors and all_or_nothing:
                    raise _whole_request_error(errors)
        versions = None
        if len(valid):
            stages = self.trace_stages
            if stages:
                t_validated = time.perf_counter()
            features = self._state.update(tx, np.empty((len(valid), NUM_FEATURES)))
            took_degraded = self._took_degraded
            if took_degraded is not None and took_degraded():
                flagged[:] = True
                for i in valid.tolist():
                    flags[i] = (*flags[i], STATE_UNAVAILABLE)
            if stages:
                t_features = time.perf_counter()
            groups = self._route_rows(model, tx.card_key, route, all_or_nothing)
            if len(groups) > 1:
                versions = np.full(rows, "", dtype=object)
            for runtime, rows_of in groups:
                self._score_rows(
                    runtime, rows_of, valid, features, tx, flagged, flags, columns,
                    probabilities, decisions, reasons, top_reasons, request_id, started,
                )  # fmt: skip
                if versions is not None:
                    versions[valid[rows_of]] = runtime.version
            if stages:
                t_done = time.perf_counter()
                CALL.stages = (
                    started, t_validated, t_features, t_done, t_done, time.perf_counter(),
                )  # fmt: skip
        else:
            groups = [(model, None)]
        answered = groups[0][0] if len(groups) == 1 else model
        return BatchOutcome(probabilities, decisions, reasons, errors, flags, versions, answered)

    def _route_rows(
        self, model: ModelRuntime, card_keys: np.ndarray, route: bool, whole: bool
    ) -> list[tuple[ModelRuntime, np.ndarray | slice]]:
        """(version, rows) groups: the canary's cards and the rest. A tensor request
        (``whole``) goes to one version, chosen by its first card."""
        registry = self.registry
        canary = registry.canary_of(model.name) if route else None
        if canary is None or not registry.is_serving(model):
            return [(model, slice(None))]
        if whole:
            return [(registry.route(model, int(card_keys[0])), slice(None))]
        to_canary = canary_buckets(card_keys) < canary[1]
        if not to_canary.any():
            return [(model, slice(None))]
        if to_canary.all():
            return [(canary[0], slice(None))]
        return [(model, np.flatnonzero(~to_canary)), (canary[0], np.flatnonzero(to_canary))]

    def _score_rows(
        self, model: ModelRuntime, rows_of: np.ndarray | slice, valid: np.ndarray,
        features: np.ndarray, tx: TransactionArrays, flagged: np.ndarray,
        flags: list[tuple[str, ...]], columns: Mapping,
        probabilities: np.ndarray, decisions: np.ndarray, reasons: list | None,
        top_reasons: int, request_id: str, started: float,
    ) -> None:  # fmt: skip
        """Predict, decide, record and mirror the rows ``rows_of`` (of the valid ones)
        with one version."""
        CALL.model = model
        index = valid[rows_of]
        rows_features = features[rows_of]
        scores = model.forest.predict(rows_features, num_threads=1)
        _check_probabilities(scores, model)
        probabilities[index] = scores
        decisions[index] = model.decisions(scores)
        if self.predictions is not None:
            self.predictions.add_many(
                request_id, index, self._clock_ms(), model.name, model.version, scores,
                decisions[index], tx.card_key[rows_of], tx.event_time_ms[rows_of], columns,
                rows_features, flags,
            )  # fmt: skip
        if self.review is not None:
            self._offer_for_review(model, index, rows_of, tx, scores, decisions,
                                   rows_features, columns, request_id)  # fmt: skip
        if self.monitor is not None:
            self.monitor.record_many(
                model.name, model.version, rows_features, tx.card_country[rows_of], scores,
                flagged[rows_of],
            )  # fmt: skip
        if reasons is not None:
            for j, i in enumerate(index):
                reasons[i] = _reasons(model, rows_features[j], top_reasons)
        mirror = self.mirror
        if mirror is not None and mirror.active:
            mirror.offer_batch(
                model.name,
                model.version,
                request_id,
                columns.get("transaction_id"),
                tx.event_time_ms[rows_of],
                tx.card_key[rows_of],
                scores,
                decisions[index],
                (time.perf_counter() - started) * 1e6 / len(valid),
                rows_features,
                columns,
                index,
                _mirrored_call_ids() if self.trace_stages else None,
                CALL.client,
            )

    def _offer_for_review(
        self, model: ModelRuntime, index: np.ndarray, rows_of: np.ndarray | slice,
        tx: TransactionArrays, scores: np.ndarray, decisions: np.ndarray,
        features: np.ndarray, columns: Mapping, request_id: str,
    ) -> None:  # fmt: skip
        """Queue the batch rows the review sink wants (ids ``<request_id>/<row>``)."""
        review = self.review
        inclusion = review.wants_many(decisions[index])
        times, cards = tx.event_time_ms[rows_of], tx.card_key[rows_of]
        tids = columns.get("transaction_id")
        for j in np.flatnonzero(inclusion).tolist():
            row = int(index[j])
            review.offer(
                model.name, model.version, f"{request_id}/{row}", tids[row] if tids else "",
                int(times[j]), int(cards[j]), float(scores[j]), decisions[row], float(inclusion[j]),
                features[j].copy(), model.feature_names, None, model.forest.top_reasons,
            )  # fmt: skip

    def _validate_batch(
        self,
        model: ModelRuntime,
        columns: Mapping[str, Sequence],
        valid: np.ndarray,
        tx: TransactionArrays,
        mcc: Sequence[int],
        errors: dict[int, InvalidInputError],
        flags: list[tuple[str, ...]],
    ) -> tuple[np.ndarray, TransactionArrays, np.ndarray]:
        """One kernel pass over the batch; rejected rows join ``errors`` and leave.

        Returns the rows kept, their encoded transactions and which of them are flagged.
        """
        assert self.policy is not None
        masks = model.validation.rows(tx, np.asarray(mcc, dtype=np.int64))
        rejected, row_flags = self.policy.apply_rows(
            masks,
            lambda j: {name: columns[name][valid[j]] for name in CHECKED_FIELDS},
            lambda j: f"transactions[{valid[j]}].",
        )
        for j, row in row_flags.items():
            flags[valid[j]] = row
        flagged = (masks & self.policy.flag_mask) != 0
        if not rejected:
            return valid, tx, flagged
        for j, exc in rejected.items():
            errors[int(valid[j])] = exc
        keep = np.flatnonzero([j not in rejected for j in range(len(valid))])
        return valid[keep], tx.take(keep), flagged[keep]

    def score_features(self, model: ModelRuntime, features: np.ndarray) -> BatchOutcome:
        """Score ready-made feature rows (n, NUM_FEATURES): stateless, never mirrored.

        This is how a primary riskwire, or any client with its own feature pipeline,
        uses this server as a plain model endpoint (e.g. as a remote shadow target).
        """
        if features.ndim != 2 or features.shape[1] != NUM_FEATURES:
            raise InvalidInputError(
                f"features: expected shape [n, {NUM_FEATURES}], got {list(features.shape)}",
                field="features",
            )
        if len(features) > self.max_batch_rows:
            raise InvalidInputError(
                f"features: {len(features)} rows exceed the limit of {self.max_batch_rows}",
                field="features",
            )
        scores = model.forest.predict(features, num_threads=1)
        _check_probabilities(scores, model)
        return BatchOutcome(scores, model.decisions(scores), None, {}, [()] * len(scores))


def _whole_request_error(errors: dict[int, InvalidInputError]) -> InvalidInputError:
    """One error for a request that succeeds or fails whole (tensor APIs)."""
    first = min(errors)
    more = f" (and {len(errors) - 1} more rows)" if len(errors) > 1 else ""
    violations = [v for i in sorted(errors) for v in errors[i].violations]
    return InvalidInputError(
        f"row {first}: {errors[first]}{more}; no row was scored", violations=violations
    )


def _take(values: Sequence, index: np.ndarray, subset: bool) -> Sequence:
    if not subset:
        return values
    if isinstance(values, np.ndarray):
        return values[index]
    return [values[i] for i in index]


def _may_have_bad_rows(
    card_ids: Sequence, merchant_ids: Sequence, amounts: Sequence, times: Sequence
) -> bool:
    """Whether any row could fail :func:`_check_row` (vectorised; the row-by-row check,
    with its messages, runs only then)."""
    if not (all(card_ids) and all(merchant_ids)):
        return True
    try:
        amount = np.asarray(amounts, dtype=np.float64)
        return bool((~(amount >= 0.0) | ~np.isfinite(amount)).any()) or bool(
            (np.asarray(times, dtype=np.int64) < 0).any()
        )
    except (TypeError, ValueError, OverflowError):
        return True


def _check_row(
    card_id: str, merchant_id: str, amount: float, event_time_ms: int, prefix: str
) -> None:
    if not card_id:
        raise InvalidInputError(
            f"{prefix}card_id: expected a non-empty string, got ''", field=f"{prefix}card_id"
        )
    if not merchant_id:
        raise InvalidInputError(
            f"{prefix}merchant_id: expected a non-empty string, got ''",
            field=f"{prefix}merchant_id",
        )
    if not (amount >= 0.0 and math.isfinite(amount)):
        raise InvalidInputError(
            f"{prefix}amount: expected a finite number >= 0, got {amount!r}",
            field=f"{prefix}amount",
        )
    if event_time_ms < 0:
        raise InvalidInputError(
            f"{prefix}event_time_ms: expected epoch milliseconds >= 0 (0 = now), "
            f"got {event_time_ms}",
            field=f"{prefix}event_time_ms",
        )


def _check_probability(probability: float, model: ModelRuntime) -> None:
    if not 0.0 <= probability <= 1.0:
        raise OutputValidationError(
            f"model {model.name} v{model.version} produced probability {probability!r}, "
            "outside [0, 1]; no decision was made"
        )


def _check_probabilities(scores: np.ndarray, model: ModelRuntime) -> None:
    bad = ~((scores >= 0.0) & (scores <= 1.0))
    if bad.any():
        _check_probability(float(scores[np.argmax(bad)]), model)


def _reasons(model: ModelRuntime, row: np.ndarray, k: int) -> list[tuple[str, float, float]]:
    names = model.feature_names
    return [
        (names[j], contribution, float(row[j]))
        for j, contribution in model.forest.top_reasons(row, k)
    ]
