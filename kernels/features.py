"""Feature kernels: stateless transaction features plus per-card history features.

One kernel serves the offline build (the whole time-ordered history, millions of rows)
and the server (one row per request): rows are processed in order, each row's features
are computed from the card's state *before* the row, then the state is updated with it.
Columns follow :data:`riskwire.kernels.schema.FEATURE_NAMES`. Definitions (``t`` is the
row's ``event_time_ms``; ``-1`` codes are unknown):

Stateless
    amount          the raw amount
    log_amount      ``log1p(max(amount, 0))`` (NaN stays NaN)
    hour_sin/cos    ``sin/cos(2*pi*h/24)``, ``h`` = UTC hour of day incl. fractions
                    (``(t mod 86_400_000) / 3_600_000``)
    dow_sin/cos     ``sin/cos(2*pi*d/7)``, ``d`` = UTC day of week, Monday = 0
                    (``(floor(t / 86_400_000) + 3) mod 7``; epoch day 0 was a Thursday)
    is_foreign      1.0 if country != card_country else 0.0; NaN if either is unknown
    channel, mcc, country, currency   the integer codes as floats (-1.0 = unknown)

Stateful, over the card's previous transactions
    card_count_{1h,24h,7d}   sum of ``exp(-(T - T_j) / tau)`` with tau = 1 h, 24 h, 7 d
    card_amount_{1h,24h,7d}  the same sums weighted by amount ``a_j``
    secs_since_prev          ``(T - L) / 1000``; NaN for the card's first transaction
    amount_to_mean           amount / mean of previous amounts; NaN without history or
                             when the mean is 0
    amount_zscore            (amount - mean) / sample std (n - 1) of previous amounts;
                             NaN with fewer than 2 previous amounts or std == 0
    is_new_merchant          1.0 unless the merchant is among the card's last 16 merchants
    is_new_country           1.0 unless the country code (-1 included) is among the
                             card's last 8 countries
    card_txn_count           number of previous transactions (lifetime)

Times are clamped so a card's clock never runs backwards: ``L`` is the latest event time
seen for the card, a row is treated as happening at ``T = max(t, L)`` (late arrivals
count as "now"; their ``secs_since_prev`` is 0), and ``T_j`` is that effective time of
previous row ``j``. The state keeps the decayed sums as of ``L``; a row multiplies them
by ``exp(-(T - L) / tau)``, reads them, then adds 1 (or its amount).

Amount statistics use Welford's update in row order (``delta = a - mean``;
``mean += delta / n``; ``M2 += delta * (a - mean)``), which is exact-order deterministic.
A non-finite amount (NaN, inf) still counts as a transaction but is left out of the
amount sums, mean and std, so one bad value cannot poison a card's state.

Card keys must be non-zero (0 marks an empty slot). When a card's probe window in the
table is full, the window's least recently seen card is evicted (see
:mod:`riskwire.kernels.state`) and the evicted card starts over as new.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import from_dtype, njit, types

from .atomics import spin_lock, spin_unlock
from .encoding import TransactionArrays
from .schema import FEATURE_NAMES, NUM_FEATURES
from .state import (
    CNT_AMOUNT,
    CNT_TXN,
    COUNTRY_RING,
    HASH_MULTIPLIER,
    HASH_SHIFT,
    HDR_EVICTIONS,
    HDR_LOCK,
    HDR_OCCUPIED,
    HDR_PROBE_LIMIT,
    MERCHANT_RING,
    ST_AMOUNT_1H,
    ST_AMOUNT_7D,
    ST_AMOUNT_24H,
    ST_COUNT_1H,
    ST_COUNT_7D,
    ST_COUNT_24H,
    ST_M2,
    ST_MEAN,
    CardStateTable,
)

TAU_MS = (3_600_000.0, 86_400_000.0, 604_800_000.0)  # 1 h, 24 h, 7 d
_TAU_1H, _TAU_24H, _TAU_7D = TAU_MS
_MS_PER_HOUR = 3_600_000.0
_MS_PER_DAY = 86_400_000
_TWO_PI = 2.0 * math.pi
_NAN = math.nan
# sin/cos of 2*pi*d/7 for d = 0 (Monday) .. 6, as math.sin/cos compute them
_DOW_SIN = np.array([math.sin(_TWO_PI * d / 7.0) for d in range(7)])
_DOW_COS = np.array([math.cos(_TWO_PI * d / 7.0) for d in range(7)])

# Output columns by name, so the kernel follows FEATURE_NAMES whatever its order.
_COLUMNS = (
    "amount", "log_amount", "hour_sin", "hour_cos", "dow_sin", "dow_cos", "is_foreign",
    "channel", "mcc", "country", "currency", "card_count_1h", "card_count_24h",
    "card_count_7d", "card_amount_1h", "card_amount_24h", "card_amount_7d",
    "secs_since_prev", "amount_to_mean", "amount_zscore", "is_new_merchant",
    "is_new_country", "card_txn_count",
)  # fmt: skip
if sorted(_COLUMNS) != sorted(FEATURE_NAMES):  # pragma: no cover
    raise ImportError("FEATURE_NAMES changed: update _COLUMNS in kernels/features.py")
(
    _F_AMOUNT, _F_LOG_AMOUNT, _F_HOUR_SIN, _F_HOUR_COS, _F_DOW_SIN, _F_DOW_COS,
    _F_IS_FOREIGN, _F_CHANNEL, _F_MCC, _F_COUNTRY, _F_CURRENCY,
    _F_COUNT_1H, _F_COUNT_24H, _F_COUNT_7D, _F_AMOUNT_1H, _F_AMOUNT_24H, _F_AMOUNT_7D,
    _F_SECS_SINCE_PREV, _F_AMOUNT_TO_MEAN, _F_AMOUNT_ZSCORE, _F_NEW_MERCHANT,
    _F_NEW_COUNTRY, _F_TXN_COUNT,
) = (FEATURE_NAMES.index(name) for name in _COLUMNS)  # fmt: skip

# Status codes the kernels return (0 = ok); the wrappers turn them into ValueError.
_BAD_LENGTH, _BAD_OUT_SHAPE, _ZERO_KEY = 1, 2, 3

# Kernel signatures: inputs read-only C arrays (writable arrays convert implicitly, so
# zero-copy np.frombuffer inputs work), state and output writable C arrays.
_TX_FIELDS = TransactionArrays.__slots__
_TX_DTYPES = (np.uint64, np.uint64, np.int64, np.float64) + (np.int32,) * 5
_TX_TYPES = tuple(types.Array(from_dtype(np.dtype(d)), 1, "C", readonly=True) for d in _TX_DTYPES)
_STATE_TYPES = (  # CardStateTable.arrays
    types.int64[::1], types.uint64[::1], types.int64[::1], types.int64[:, ::1],
    types.float64[:, ::1], types.uint64[:, ::1], types.int32[:, ::1],
)  # fmt: skip
_OUT_TYPE = types.float64[:, ::1]
# Helpers are inlined into the kernels (numba will not inline them across its calls), and
# the probing lives here rather than in state.py because numba's cache does not notice
# edits to other modules.
_inline = njit(inline="always", nogil=True, cache=True)
_HASH_MULTIPLIER = np.uint64(HASH_MULTIPLIER)
_HASH_SHIFT = np.uint64(HASH_SHIFT)
_EMPTY = np.uint64(0)
_INT64_MAX = np.int64(np.iinfo(np.int64).max)


@_inline
def _home_slot(key, mask):
    """First slot probed for a uint64 key (see CardStateTable.find)."""
    h = key * _HASH_MULTIPLIER
    h ^= h >> _HASH_SHIFT
    return np.int64(h & mask)


@_inline
def _find_slot(keys, key, probe_limit):
    """Slot of ``key`` or -1; never modifies the table."""
    mask = keys.shape[0] - 1
    s = _home_slot(key, np.uint64(mask))
    for _ in range(probe_limit):
        k = keys[s]
        if k == key:
            return s
        if k == _EMPTY:
            return -1
        s = (s + 1) & mask
    return -1


@_inline
def _acquire_slot(header, keys, last_time_ms, counts, stats, merchants, countries, key, limit):
    """Slot of ``key``, inserting it or evicting the window's least recently seen card."""
    mask = keys.shape[0] - 1
    s = _home_slot(key, np.uint64(mask))
    victim = -1
    victim_time = _INT64_MAX
    for _ in range(limit):
        k = keys[s]
        if k == key:
            return s
        if k == _EMPTY:
            keys[s] = key
            header[HDR_OCCUPIED] += 1
            return s
        if last_time_ms[s] < victim_time:
            victim = s
            victim_time = last_time_ms[s]
        s = (s + 1) & mask
    header[HDR_EVICTIONS] += 1
    keys[victim] = key
    last_time_ms[victim] = 0
    counts[victim, :] = 0
    stats[victim, :] = 0.0
    merchants[victim, :] = 0
    countries[victim, :] = 0
    return victim


@_inline
def _stateless_row(i, t, amount, mcc, country, card_country, currency, channel, out) -> None:
    out[i, _F_AMOUNT] = amount
    out[i, _F_LOG_AMOUNT] = math.log1p(0.0 if amount < 0.0 else amount)
    hour = (t % _MS_PER_DAY) / _MS_PER_HOUR
    out[i, _F_HOUR_SIN] = math.sin(_TWO_PI * hour / 24.0)
    out[i, _F_HOUR_COS] = math.cos(_TWO_PI * hour / 24.0)
    dow = (t // _MS_PER_DAY + 3) % 7
    out[i, _F_DOW_SIN] = _DOW_SIN[dow]
    out[i, _F_DOW_COS] = _DOW_COS[dow]
    if country < 0 or card_country < 0:
        out[i, _F_IS_FOREIGN] = _NAN
    else:
        out[i, _F_IS_FOREIGN] = 1.0 if country != card_country else 0.0
    out[i, _F_CHANNEL] = channel
    out[i, _F_MCC] = mcc
    out[i, _F_COUNTRY] = country
    out[i, _F_CURRENCY] = currency


@_inline
def _stateful_row(
    i, s, t, amount, merchant, country, last_time_ms, counts, stats, merchants, countries, out
):
    """History features from slot ``s`` (-1 = unknown card); returns the decay factors."""
    n_txn = counts[s, CNT_TXN] if s >= 0 else 0
    if n_txn == 0:
        out[i, _F_COUNT_1H] = out[i, _F_COUNT_24H] = out[i, _F_COUNT_7D] = 0.0
        out[i, _F_AMOUNT_1H] = out[i, _F_AMOUNT_24H] = out[i, _F_AMOUNT_7D] = 0.0
        out[i, _F_SECS_SINCE_PREV] = _NAN
        out[i, _F_AMOUNT_TO_MEAN] = _NAN
        out[i, _F_AMOUNT_ZSCORE] = _NAN
        out[i, _F_NEW_MERCHANT] = 1.0
        out[i, _F_NEW_COUNTRY] = 1.0
        out[i, _F_TXN_COUNT] = 0.0
        return 0.0, 0.0, 0.0
    dt = t - last_time_ms[s]
    if dt < 0:
        dt = 0
    d1 = math.exp(-dt / _TAU_1H)
    d24 = math.exp(-dt / _TAU_24H)
    d7 = math.exp(-dt / _TAU_7D)
    out[i, _F_COUNT_1H] = stats[s, ST_COUNT_1H] * d1
    out[i, _F_COUNT_24H] = stats[s, ST_COUNT_24H] * d24
    out[i, _F_COUNT_7D] = stats[s, ST_COUNT_7D] * d7
    out[i, _F_AMOUNT_1H] = stats[s, ST_AMOUNT_1H] * d1
    out[i, _F_AMOUNT_24H] = stats[s, ST_AMOUNT_24H] * d24
    out[i, _F_AMOUNT_7D] = stats[s, ST_AMOUNT_7D] * d7
    out[i, _F_SECS_SINCE_PREV] = dt / 1000.0
    n_amount = counts[s, CNT_AMOUNT]
    mean = stats[s, ST_MEAN]
    out[i, _F_AMOUNT_TO_MEAN] = amount / mean if n_amount > 0 and mean != 0.0 else _NAN
    std = math.sqrt(stats[s, ST_M2] / (n_amount - 1)) if n_amount > 1 else 0.0
    out[i, _F_AMOUNT_ZSCORE] = (amount - mean) / std if std > 0.0 else _NAN
    new_merchant = 1.0
    for j in range(min(n_txn, MERCHANT_RING)):
        if merchants[s, j] == merchant:
            new_merchant = 0.0
            break
    out[i, _F_NEW_MERCHANT] = new_merchant
    new_country = 1.0
    for j in range(min(n_txn, COUNTRY_RING)):
        if countries[s, j] == country:
            new_country = 0.0
            break
    out[i, _F_NEW_COUNTRY] = new_country
    out[i, _F_TXN_COUNT] = n_txn
    return d1, d24, d7


@_inline
def _update_slot(
    s, t, amount, merchant, country, d1, d24, d7, last_time_ms, counts, stats, merchants,
    countries,
) -> None:  # fmt: skip
    n_txn = counts[s, CNT_TXN]
    finite = math.isfinite(amount)
    a = amount if finite else 0.0
    stats[s, ST_COUNT_1H] = stats[s, ST_COUNT_1H] * d1 + 1.0
    stats[s, ST_COUNT_24H] = stats[s, ST_COUNT_24H] * d24 + 1.0
    stats[s, ST_COUNT_7D] = stats[s, ST_COUNT_7D] * d7 + 1.0
    stats[s, ST_AMOUNT_1H] = stats[s, ST_AMOUNT_1H] * d1 + a
    stats[s, ST_AMOUNT_24H] = stats[s, ST_AMOUNT_24H] * d24 + a
    stats[s, ST_AMOUNT_7D] = stats[s, ST_AMOUNT_7D] * d7 + a
    if finite:
        n_amount = counts[s, CNT_AMOUNT] + 1
        delta = amount - stats[s, ST_MEAN]
        stats[s, ST_MEAN] += delta / n_amount
        stats[s, ST_M2] += delta * (amount - stats[s, ST_MEAN])
        counts[s, CNT_AMOUNT] = n_amount
    merchants[s, n_txn % MERCHANT_RING] = merchant
    countries[s, n_txn % COUNTRY_RING] = country
    counts[s, CNT_TXN] = n_txn + 1
    if n_txn == 0 or t > last_time_ms[s]:
        last_time_ms[s] = t


@_inline
def _features_rows(
    header, keys, last_time_ms, counts, stats, merchants, countries,
    card_key, merchant_key, event_time_ms, amount, mcc, country, card_country, currency,
    channel, out, update, probe_limit,
) -> None:  # fmt: skip
    n = amount.shape[0]
    for i in range(n):
        t = event_time_ms[i]
        a = amount[i]
        _stateless_row(i, t, a, mcc[i], country[i], card_country[i], currency[i], channel[i], out)
        if update:
            s = _acquire_slot(
                header, keys, last_time_ms, counts, stats, merchants, countries, card_key[i],
                probe_limit,
            )  # fmt: skip
        else:
            s = _find_slot(keys, card_key[i], probe_limit)
        d1, d24, d7 = _stateful_row(
            i, s, t, a, merchant_key[i], country[i], last_time_ms, counts, stats, merchants,
            countries, out,
        )  # fmt: skip
        if update:
            _update_slot(
                s, t, a, merchant_key[i], country[i], d1, d24, d7, last_time_ms, counts, stats,
                merchants, countries,
            )  # fmt: skip


@njit(
    types.int64(*_STATE_TYPES, *_TX_TYPES, _OUT_TYPE, types.boolean, types.int64),
    cache=True,
    nogil=True,
)
def _features_kernel(
    header, keys, last_time_ms, counts, stats, merchants, countries,
    card_key, merchant_key, event_time_ms, amount, mcc, country, card_country, currency,
    channel, out, update, owner,
) -> int:  # fmt: skip
    """Features of rows 0..n-1 in order; with ``update`` each row then updates its card.

    The whole pass holds the table's spinlock (``header[HDR_LOCK]``) for ``owner``, so
    processes and threads sharing a table apply their transactions one call at a time.
    """
    n = amount.shape[0]
    for length in (card_key.size, merchant_key.size, event_time_ms.size, mcc.size, country.size,
                   card_country.size, currency.size, channel.size):  # fmt: skip
        if length != n:
            return _BAD_LENGTH
    if out.shape[0] != n or out.shape[1] != NUM_FEATURES:
        return _BAD_OUT_SHAPE
    for i in range(n):
        if card_key[i] == _EMPTY:
            return _ZERO_KEY
    # header may live in shared memory: never trust it to be in range
    probe_limit = max(1, min(header[HDR_PROBE_LIMIT], keys.shape[0]))
    spin_lock(header, HDR_LOCK, owner)
    _features_rows(
        header, keys, last_time_ms, counts, stats, merchants, countries, card_key,
        merchant_key, event_time_ms, amount, mcc, country, card_country, currency, channel,
        out, update, probe_limit,
    )  # fmt: skip
    spin_unlock(header, HDR_LOCK)
    return 0


@njit(
    types.int64(*_STATE_TYPES, _TX_TYPES[0], types.int64[::1], types.int64),
    cache=True,
    nogil=True,
)
def _slots_kernel(
    header, keys, last_time_ms, counts, stats, merchants, countries, card_keys, slots, owner
) -> int:  # fmt: skip
    """Slot of every card key, inserting the missing ones (under the table's lock)."""
    if slots.shape[0] != card_keys.shape[0]:
        return _BAD_LENGTH
    for j in range(card_keys.shape[0]):
        if card_keys[j] == _EMPTY:
            return _ZERO_KEY
    probe_limit = max(1, min(header[HDR_PROBE_LIMIT], keys.shape[0]))
    spin_lock(header, HDR_LOCK, owner)
    for j in range(card_keys.shape[0]):
        slots[j] = _acquire_slot(
            header, keys, last_time_ms, counts, stats, merchants, countries, card_keys[j],
            probe_limit,
        )  # fmt: skip
    spin_unlock(header, HDR_LOCK)
    return 0


def card_slots(table: CardStateTable, card_keys: np.ndarray) -> np.ndarray:
    """Slot index of each card in ``table``, inserting the cards it does not hold (probing
    and eviction exactly as the feature kernel does). With distinct keys and a table of at
    least twice as many slots whose probe limit is its capacity, nothing is evicted."""
    slots = np.empty(len(card_keys), dtype=np.int64)
    keys = np.ascontiguousarray(card_keys, dtype=np.uint64)
    status = _slots_kernel(*table.arrays, keys, slots, _OWNER)
    if status == _ZERO_KEY:
        raise ValueError("card keys must be non-zero")
    return slots


def compute_features(
    table: CardStateTable, tx: TransactionArrays, out: np.ndarray | None = None
) -> np.ndarray:
    """Features of ``tx`` (rows in order), updating ``table`` with each row.

    ``out``, if given, must be a writable C-contiguous float64 array of shape
    ``(len(tx), NUM_FEATURES)``; it is filled and returned (no allocation). Calls that
    share a table serialise on its spinlock inside the kernel (the GIL is released).
    """
    if out is None:
        out = np.empty((len(tx.amount), NUM_FEATURES))
    _run(table.arrays, tx, out, True)
    return out


def peek_features(
    table: CardStateTable, tx: TransactionArrays, out: np.ndarray | None = None
) -> np.ndarray:
    """Features of ``tx`` against ``table`` as it is, without updating or inserting.

    Every row sees the same state (rows do not see each other), e.g. for a shadow model
    that must not update the state a second time.
    """
    if out is None:
        out = np.empty((len(tx.amount), NUM_FEATURES))
    _run(table.arrays, tx, out, False)
    return out


def compute_features_offline(
    tx: TransactionArrays,
    *,
    capacity: int | None = None,
    probe_limit: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, CardStateTable]:
    """One pass over a time-ordered history: features of every row and the final table.

    By default the table has the next power of two >= 2x the distinct cards (at least
    1024) slots; check ``table.evictions`` when passing a smaller ``capacity``.
    """
    if capacity is None:
        cards = int(np.unique(tx.card_key).size) if len(tx.card_key) else 0
        capacity = max(1024, 1 << max(2 * cards - 1, 1).bit_length())
    table = CardStateTable.create(capacity, probe_limit=probe_limit)
    return compute_features(table, tx, out), table


def warmup() -> None:
    """Run the kernel once on a tiny batch, so the first request pays no set-up cost.

    The kernel itself is compiled (or loaded from numba's cache) on import.
    """
    tx = TransactionArrays(*(np.ones(1, dtype=dtype) for dtype in _TX_DTYPES))
    table = CardStateTable.create(1024)
    compute_features(table, tx)
    peek_features(table, tx)


_OWNER = os.getpid()  # lock owner id; spawn-started workers each get their own


def _run(state: tuple, tx: TransactionArrays, out: np.ndarray, update: bool) -> None:
    try:
        status = _features_kernel(
            *state, tx.card_key, tx.merchant_key, tx.event_time_ms, tx.amount, tx.mcc,
            tx.country, tx.card_country, tx.currency, tx.channel, out, update, _OWNER,
        )  # fmt: skip
    except TypeError as exc:  # no matching signature: say which argument is wrong
        _raise_bad_inputs(tx, out, exc)
    if status:
        _raise_bad_inputs(tx, out, None, status)


def _raise_bad_inputs(tx, out, exc: Exception | None, status: int = 0) -> None:
    """Raise a ValueError that names the offending argument."""
    n = len(tx.amount)
    for name, dtype in zip(_TX_FIELDS, _TX_DTYPES, strict=True):
        arr = getattr(tx, name)
        want = np.dtype(dtype)
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"tx.{name} must be a numpy array, got {type(arr).__name__}") from exc
        if arr.dtype != want or arr.ndim != 1:
            raise ValueError(
                f"tx.{name} must be a 1-D {want} array, got {arr.ndim}-D {arr.dtype}"
            ) from exc
        if not (arr.flags.c_contiguous and arr.flags.aligned):
            raise ValueError(f"tx.{name} must be C-contiguous and aligned") from exc
        if len(arr) != n:
            raise ValueError(
                f"tx.{name} has {len(arr)} rows but tx.amount has {n}; all fields need equal length"
            ) from exc
    if status == _ZERO_KEY:
        raise ValueError("tx.card_key must be non-zero (0 marks an empty state slot)")
    if not isinstance(out, np.ndarray) or out.dtype != np.float64 or out.ndim != 2:
        raise ValueError("out must be a 2-D float64 numpy array") from exc
    if not (out.flags.c_contiguous and out.flags.writeable and out.flags.aligned):
        raise ValueError("out must be C-contiguous, aligned and writable") from exc
    if out.shape != (n, NUM_FEATURES):
        raise ValueError(f"out has shape {out.shape}, expected {(n, NUM_FEATURES)}")
    raise ValueError(f"invalid kernel arguments: {exc}") from exc
