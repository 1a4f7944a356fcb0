"""Deterministic synthetic card-payment traffic with injected, labelled fraud.

Legitimate traffic comes from cards with their own habits: a home country (and currency),
an amount scale, a few usual merchants, a preferred time of day, a transaction rate and
the odd trip abroad. Three fraud patterns are interleaved with it (label 1):

* card testing: bursts of 5-30 tiny e-commerce payments within minutes, new merchants;
* account takeover: a few large payments within hours, mostly abroad and at night, at
  new high-risk merchants (electronics, jewelry, money transfer, gambling);
* compromised merchants: for a few days a merchant runs stolen cards, often keyed in
  by hand (moto) and after hours.

Legitimate night-time travel, rare large purchases and a little label noise keep the
classes overlapping. Amounts are drawn in EUR and converted to the merchant's currency.
Everything is drawn from one ``Generator(PCG64(seed))``, so the same ``rows`` and
``seed`` give the same table and byte-identical Parquet.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..kernels.schema import CHANNELS, LABEL_COLUMN
from .data import write_table

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
DEFAULT_DAYS = 45.0
MAX_ROWS = 100_000_000  # keeps string offsets within int32

_STR = pa.string()
SCHEMA = pa.schema([
    ("transaction_id", _STR), ("card_id", _STR), ("merchant_id", _STR), ("mcc", pa.int32()),
    ("amount", pa.float64()), ("currency", _STR), ("country", _STR), ("card_country", _STR),
    ("channel", _STR), ("event_time", pa.timestamp("ms", tz="UTC")), (LABEL_COLUMN, pa.int8()),
])  # fmt: skip
"""Columns and types of a generated table: the raw schema plus ``label``."""

# country: (currency, units per EUR, UTC offset in hours; DST ignored)
_COUNTRY_INFO: dict[str, tuple[str, float, float]] = {
    "DE": ("EUR", 1.0, 1), "FR": ("EUR", 1.0, 1), "GB": ("GBP", 0.85, 0),
    "US": ("USD", 1.08, -5), "ES": ("EUR", 1.0, 1), "IT": ("EUR", 1.0, 1),
    "NL": ("EUR", 1.0, 1), "PL": ("PLN", 4.3, 1), "SE": ("SEK", 11.5, 1),
    "CH": ("CHF", 0.95, 1), "BE": ("EUR", 1.0, 1), "AT": ("EUR", 1.0, 1),
    "IE": ("EUR", 1.0, 0), "LU": ("EUR", 1.0, 1), "PT": ("EUR", 1.0, 0),
    "GR": ("EUR", 1.0, 2), "HR": ("EUR", 1.0, 1), "TR": ("TRY", 35.0, 3),
    "TH": ("THB", 38.0, 7), "AE": ("AED", 4.0, 4), "JP": ("JPY", 160.0, 9),
    "MX": ("MXN", 19.0, -6), "CA": ("CAD", 1.47, -5), "EG": ("EGP", 52.0, 2),
    "MA": ("MAD", 10.8, 1), "CN": ("CNY", 7.8, 8), "RU": ("RUB", 100.0, 3),
    "UA": ("UAH", 44.0, 2), "NG": ("NGN", 1650.0, 1), "BR": ("BRL", 5.8, -3),
    "RO": ("RON", 5.0, 2), "ID": ("IDR", 17000.0, 7), "VN": ("VND", 27000.0, 7),
    "IN": ("INR", 90.0, 5.5),
}  # fmt: skip
_ZERO_DECIMAL_CURRENCIES = ("JPY", "IDR", "VND")
_HOME = {"DE": 20, "US": 20, "FR": 14, "GB": 14, "ES": 8, "IT": 8, "NL": 5, "PL": 4,
         "SE": 3, "CH": 2, "BE": 1, "AT": 1}  # fmt: skip
_TRAVEL = {"ES": 3, "FR": 3, "IT": 3, "US": 3, "GB": 2, "DE": 2, "PT": 2, "GR": 2, "HR": 1,
           "TR": 1.5, "TH": 1, "AE": 1, "JP": 1, "MX": 1, "CA": 1, "EG": 0.5, "MA": 0.5,
           "NL": 1, "AT": 1, "CH": 1}  # fmt: skip
_FRAUD_ORIGIN = {"RU": 2, "UA": 1.5, "NG": 2, "CN": 1.5, "BR": 1.5, "RO": 1.5, "ID": 1,
                 "VN": 1, "IN": 1, "US": 1.5, "GB": 1, "TR": 1}  # fmt: skip
_ONLINE_HUBS = {"US": 3, "IE": 2, "LU": 2, "NL": 2, "GB": 2, "DE": 1, "FR": 1, "CN": 1.5}

# mcc, share of merchants, median amount in EUR, share of merchants that sell online
_MCC_TABLE = (
    (5411, 16, 35, 0.05), (5812, 12, 40, 0.0), (5814, 10, 12, 0.05), (5541, 8, 55, 0.0),
    (5999, 8, 30, 0.3), (4111, 5, 4, 0.2), (4121, 4, 20, 0.4), (5912, 6, 18, 0.1),
    (5311, 6, 70, 0.3), (5691, 5, 60, 0.4), (5732, 4, 250, 0.5), (5944, 1.5, 400, 0.2),
    (7995, 1.5, 40, 0.8), (6011, 5, 100, 0.0), (4829, 1.5, 200, 0.7), (7011, 3, 180, 0.6),
    (4511, 2, 300, 0.9), (5967, 3, 25, 1.0), (5815, 4, 9, 1.0),
)  # fmt: skip
_HIGH_RISK_MCCS = (5732, 5944, 4829, 7995)

_CTRY = tuple(_COUNTRY_INFO)
_CTRY_INDEX = {c: i for i, c in enumerate(_CTRY)}
_CURRENCY, _FX, _TZ = (np.array(col) for col in zip(*_COUNTRY_INFO.values(), strict=True))
_MINOR = np.array([1.0 if cur in _ZERO_DECIMAL_CURRENCIES else 100.0 for cur in _CURRENCY])
_MCC, _MCC_W, _MCC_MEDIAN, _MCC_ONLINE = (np.array(c) for c in zip(*_MCC_TABLE, strict=True))
_RISKY = np.isin(_MCC, _HIGH_RISK_MCCS)
_POS, _ECOM, _ATM, _MOTO, _CONTACTLESS = (
    CHANNELS.index(c) for c in ("pos", "ecommerce", "atm", "moto", "contactless")
)
_DAY_S = 86_400.0


def _pick(rng: np.random.Generator, weights: dict[str, float], size: int) -> np.ndarray:
    """Country indices drawn from a weight table."""
    keys = np.array([_CTRY_INDEX[c] for c in weights])
    p = np.array(list(weights.values()), dtype=float)
    return keys[rng.choice(len(keys), size=size, p=p / p.sum())]


@dataclass(frozen=True, slots=True)
class _Merchants:
    mcc: np.ndarray  # index into _MCC_TABLE
    country: np.ndarray  # index into _CTRY
    channel: np.ndarray  # base channel code
    popularity: np.ndarray
    online: np.ndarray  # bool
    regular: np.ndarray  # bool: False for the cash-out merchants below
    risky_pool: np.ndarray  # ids of high-risk merchants in fraud-origin countries

    @staticmethod
    def build(rng: np.random.Generator, n: int) -> _Merchants:
        groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # country, mcc, online
        phys_p, online_p = _MCC_W * (1 - _MCC_ONLINE), _MCC_W * _MCC_ONLINE
        for weights, share in ((_HOME, 0.55), (_TRAVEL, 0.2)):  # physical, per country
            total = sum(weights.values())
            for c, w in weights.items():
                k = max(8, round(n * share * w / total))
                mcc = rng.choice(len(_MCC), size=k, p=phys_p / phys_p.sum())
                groups.append((np.full(k, _CTRY_INDEX[c]), mcc, np.zeros(k, bool)))
        k = max(40, round(n * 0.2))
        hub = rng.random(k) < 0.35  # the rest sell from their customers' countries
        online_country = np.where(hub, _pick(rng, _ONLINE_HUBS, k), _pick(rng, _HOME, k))
        mcc = rng.choice(len(_MCC), size=k, p=online_p / online_p.sum())
        groups.append((online_country, mcc, np.ones(k, bool)))
        k = max(24, round(n * 0.05))  # high-risk merchants where stolen cards are cashed out
        risky_idx = np.flatnonzero(_RISKY)
        groups.append((_pick(rng, _FRAUD_ORIGIN, k), rng.choice(risky_idx, k), rng.random(k) < 0.5))
        country, mcc, online = (np.concatenate(g) for g in zip(*groups, strict=True))
        channel = np.where(online, np.where(rng.random(len(mcc)) < 0.05, _MOTO, _ECOM), _POS)
        channel = np.where(_MCC[mcc] == 6011, _ATM, channel)
        regular = np.arange(len(mcc)) < len(mcc) - k
        popularity = rng.lognormal(0.0, 1.0, len(mcc))
        cash_out = np.flatnonzero(~regular)
        return _Merchants(mcc, country, channel, popularity, online, regular, cash_out)

    def sample(self, rng: np.random.Generator, ids: np.ndarray, size: int) -> np.ndarray:
        """Popularity-weighted draws from a set of merchant ids."""
        p = self.popularity[ids]
        return ids[rng.choice(len(ids), size=size, p=p / p.sum())]


@dataclass(frozen=True, slots=True)
class _Cards:
    home: np.ndarray  # country index
    activity: np.ndarray  # relative transaction rate
    amount_scale: np.ndarray  # lognormal multiplier of the MCC median
    pref_hour: np.ndarray  # preferred local hour
    hour_spread: np.ndarray
    online_share: np.ndarray
    contactless: np.ndarray  # probability of tapping when allowed
    usual: np.ndarray  # (n, 12) usual merchants: 10 physical slots then 2 online
    n_usual: np.ndarray  # physical slots in use
    trip: np.ndarray  # (n, 3): start s, end s, destination (end == start: no trip)

    @staticmethod
    def build(rng: np.random.Generator, n: int, m: _Merchants, span_s: float) -> _Cards:
        home = _pick(rng, _HOME, n)
        usual = np.empty((n, 12), dtype=np.int64)
        usual[:, 10:] = m.sample(rng, np.flatnonzero(m.online & m.regular), 2 * n).reshape(n, 2)
        for c in np.unique(home):  # fixed order: ascending country index
            rows = np.flatnonzero(home == c)
            local = np.flatnonzero((m.country == c) & ~m.online & m.regular)
            usual[rows, :10] = m.sample(rng, local, 10 * len(rows)).reshape(-1, 10)
            shops = np.flatnonzero((m.country == c) & m.online & m.regular)
            if len(shops):  # web shops are mostly domestic too
                shops = m.sample(rng, shops, 2 * len(rows)).reshape(-1, 2)
                keep = rng.random((len(rows), 2)) < 0.3
                usual[rows, 10:] = np.where(keep, usual[rows, 10:], shops)
        trip_len = np.minimum(rng.uniform(2, 10, n) * _DAY_S, span_s * 0.5)
        trip_start = rng.uniform(0, 1, n) * (span_s - trip_len)
        has_trip = rng.random(n) < 0.3
        dest = _pick(rng, _TRAVEL, 2 * n).reshape(n, 2)
        dest = np.where(dest[:, 0] == home, dest[:, 1], dest[:, 0])
        trip_end = np.where(has_trip, trip_start + trip_len, trip_start)
        return _Cards(
            home=home,
            activity=rng.lognormal(0.0, 0.8, n),
            amount_scale=rng.lognormal(0.0, 0.5, n),
            pref_hour=rng.choice([9.0, 13.0, 19.0, 23.5], n, p=[0.3, 0.25, 0.35, 0.1])
            + rng.normal(0, 1.5, n),
            hour_spread=rng.uniform(1.5, 3.5, n),
            online_share=rng.uniform(0.05, 0.35, n),
            contactless=rng.uniform(0.2, 0.9, n),
            usual=usual,
            n_usual=rng.integers(3, 11, n),
            trip=np.stack([trip_start, trip_end, dest], axis=1),
        )

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Cards weighted by activity (fraudsters hit cards in use)."""
        return rng.choice(len(self.home), size=size, p=self.activity / self.activity.sum())


@dataclass(frozen=True, slots=True)
class _Rows:
    card: np.ndarray
    merchant: np.ndarray
    t_s: np.ndarray  # seconds since start (float)
    amount_eur: np.ndarray
    label: np.ndarray  # int8
    channel: np.ndarray  # int8 channel code, -1: the merchant's usual channel


@dataclass(frozen=True, slots=True)
class _World:
    rng: np.random.Generator
    merchants: _Merchants
    cards: _Cards
    span_s: float  # length of the period
    start_s: float  # epoch seconds at its start


def _rows(card: np.ndarray, merchant: np.ndarray, t_s: np.ndarray, amount_eur: np.ndarray,
          label: int, channel: int | np.ndarray = -1) -> _Rows:  # fmt: skip
    labels, channels = np.full(len(card), label, np.int8), np.broadcast_to(channel, len(card))
    return _Rows(card, merchant, t_s, amount_eur, labels, channels.astype(np.int8))


def _legit(w: _World, n: int) -> _Rows:
    """Everyday traffic: each card a Poisson process shaped by its habits."""
    rng, m, cards = w.rng, w.merchants, w.cards
    p = cards.activity / cards.activity.sum()
    card = np.repeat(np.arange(len(p)), rng.multinomial(n, p))
    t_s, in_trip, dest = _legit_times(w, card)
    merchant = _legit_merchants(w, card, in_trip, dest)
    amount = _MCC_MEDIAN[m.mcc[merchant]] * cards.amount_scale[card] * rng.lognormal(0, 0.5, n)
    big = rng.random(n) < 0.004  # the occasional legitimate splurge
    amount[big] *= rng.uniform(3, 12, int(big.sum()))
    return _rows(card, merchant, t_s, amount, 0)


def _legit_times(w: _World, card: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds since start (a weekend-weighted day, an hour from the card's profile)."""
    rng, cards, span_s, n = w.rng, w.cards, w.span_s, len(card)
    n_days = math.ceil(span_s / _DAY_S) + 1
    dow = (np.arange(n_days) + int(w.start_s // _DAY_S) + 3) % 7  # 1970-01-01 was a Thursday
    day_w = np.where(dow == 5, 1.2, np.where(dow == 6, 0.85, 1.0))
    day = rng.choice(n_days, size=n, p=day_w / day_w.sum())
    usual_hour = cards.pref_hour[card] + cards.hour_spread[card] * rng.standard_normal(n)
    hour = np.where(rng.random(n) < 0.8, usual_hour, rng.uniform(7, 24, n)) % 24
    tz = _TZ[cards.home[card]]
    t_s = (day * _DAY_S + (hour - tz) * 3600 - w.start_s % _DAY_S) % span_s
    trip = cards.trip[card]
    in_trip = (t_s >= trip[:, 0]) & (t_s < trip[:, 1])
    dest = trip[:, 2].astype(np.int64)
    # abroad, the local hour follows the destination's clock
    t_s = np.where(in_trip, (t_s + (tz - _TZ[dest]) * 3600) % span_s, t_s)
    return t_s, in_trip, dest


def _legit_merchants(w: _World, card: np.ndarray, in_trip: np.ndarray,
                     dest: np.ndarray) -> np.ndarray:  # fmt: skip
    """Mostly the card's usual merchants; sometimes new ones, at home or on a trip."""
    rng, m, cards, n = w.rng, w.merchants, w.cards, len(card)
    u = rng.random(n)
    physical_slot = np.minimum((cards.n_usual[card] * rng.random(n) ** 1.6).astype(np.int64), 9)
    online_slot = 10 + (rng.random(n) < 0.3)
    merchant = cards.usual[card, np.where(u < cards.online_share[card], online_slot, physical_slot)]
    explore = rng.random(n)
    new_online = (explore > 0.965) & ~in_trip
    merchant[new_online] = m.sample(
        rng, np.flatnonzero(m.online & m.regular), int(new_online.sum())
    )
    new_local = ((explore > 0.87) & ~new_online) | (in_trip & (u > 0.15))
    where_ = np.where(in_trip, dest, cards.home[card])
    for c in np.unique(where_[new_local]):
        rows = np.flatnonzero(new_local & (where_ == c))
        ids = np.flatnonzero((m.country == c) & ~m.online & m.regular)
        merchant[rows] = m.sample(rng, ids, len(rows))
    return merchant


def _offsets(rng: np.random.Generator, size: np.ndarray, *, mean_gap_s: float,
             min_gap_s: float) -> np.ndarray:  # fmt: skip
    """Seconds since each episode's first event, for episodes of ``size`` events."""
    elapsed = np.cumsum(rng.exponential(mean_gap_s, int(size.sum())) + min_gap_s)
    return elapsed - np.repeat(elapsed[np.cumsum(size) - size], size)


def _card_testing(w: _World, bursts: int) -> _Rows:
    """Bursts of tiny payments at one or two web shops, seconds apart."""
    rng, m, cards = w.rng, w.merchants, w.cards
    size = rng.integers(5, 31, bursts)
    burst = np.repeat(np.arange(bursts), size)
    card = cards.draw(rng, bursts)[burst]
    offs = _offsets(rng, size, mean_gap_s=25.0, min_gap_s=2.0)
    t_s = (rng.random(bursts) * max(w.span_s - 3600, 0.0))[burst] + offs
    shops = rng.choice(np.flatnonzero(m.online & m.regular & ~_RISKY[m.mcc]), size=(bursts, 2))
    merchant = shops[burst, (rng.random(len(burst)) < 0.3).astype(np.int64)]
    amount = np.where(rng.random(len(burst)) < 0.25, 1.0, rng.uniform(0.5, 5.0, len(burst)))
    return _rows(card, merchant, t_s, amount, 1, channel=_ECOM)


def _account_takeover(w: _World, episodes: int) -> _Rows:
    """A few large payments within hours at high-risk merchants, mostly abroad."""
    rng, m, cards, span_s = w.rng, w.merchants, w.cards, w.span_s
    size = rng.integers(2, 9, episodes)
    ep = np.repeat(np.arange(episodes), size)
    card = cards.draw(rng, episodes)[ep]
    home = cards.home[card]
    night = rng.random(episodes) < 0.6
    hour = np.where(night, rng.uniform(0, 5.5, episodes), rng.uniform(0, 24, episodes))
    day = rng.integers(0, max(1, int(span_s // _DAY_S)), episodes)
    t0 = (day * _DAY_S + hour * 3600)[ep]  # night on the victim's clock
    t0 = (t0 - _TZ[home] * 3600 - w.start_s % _DAY_S) % span_s
    t_s = t0 + _offsets(rng, size, mean_gap_s=1500.0, min_gap_s=30.0)
    merchant = rng.choice(m.risky_pool, size=(len(ep), 3))
    pick = np.argmax(m.country[merchant] != home[:, None], axis=1)  # prefer abroad
    merchant = merchant[np.arange(len(ep)), pick]
    domestic = (rng.random(episodes) < 0.35)[ep]  # a fraudster on a local proxy
    for c in np.unique(home[domestic]):
        rows = np.flatnonzero(domestic & (home == c))
        ids = np.flatnonzero(_RISKY[m.mcc] & (m.country == c))
        ids = ids if len(ids) else np.flatnonzero(m.online & _RISKY[m.mcc])
        merchant[rows] = rng.choice(ids, len(rows))
    mult = np.where(rng.random(episodes) < 0.2, rng.uniform(0.8, 2, episodes),
                    rng.uniform(2.5, 8, episodes))  # fmt: skip
    amount = _MCC_MEDIAN[m.mcc[merchant]] * cards.amount_scale[card] * mult[ep]
    amount *= rng.lognormal(0.0, 0.3, len(ep))
    return _rows(card, merchant, t_s, amount, 1)


def _compromised_merchants(w: _World, n: int) -> _Rows:
    """Stolen cards run through a few merchants during a window of days."""
    rng, m, cards, span_s = w.rng, w.merchants, w.cards, w.span_s
    candidates = np.flatnonzero(m.regular & ~_RISKY[m.mcc] & (_MCC[m.mcc] != 6011))
    shops = rng.choice(candidates, size=max(2, len(m.mcc) // 250), replace=False)
    length = np.minimum(rng.uniform(2, 7, len(shops)) * _DAY_S, span_s)
    begin = rng.uniform(0, 1, len(shops)) * (span_s - length)
    shop = rng.integers(0, len(shops), n)
    merchant = shops[shop]
    card = rng.integers(0, len(cards.home), n)  # stolen cards, many of them local
    local = rng.random(n) < 0.4
    for c in np.unique(m.country[merchant[local]]):
        rows = np.flatnonzero(local & (m.country[merchant] == c))
        ids = np.flatnonzero(cards.home == c)
        card[rows] = rng.choice(ids, len(rows)) if len(ids) else card[rows]
    t_s = begin[shop] + rng.random(n) * length[shop]
    after_hours = rng.random(n) < 0.6  # run by staff after closing, on the shop's clock
    local_s = (t_s + w.start_s + _TZ[m.country[merchant]] * 3600) % _DAY_S
    night = t_s - local_s + rng.uniform(0, 5, n) * 3600
    night = np.where(night < begin[shop], night + _DAY_S, night)  # stay inside the window
    t_s = np.where(after_hours, night, t_s)
    typical = np.maximum(_MCC_MEDIAN[m.mcc[merchant]], 40.0)  # big tickets, even at a cafe
    amount = typical * cards.amount_scale[card] * rng.uniform(2, 6, n)
    keyed = np.where(rng.random(n) < 0.75, _MOTO, -1)  # card numbers keyed in by hand
    return _rows(card, merchant, t_s, amount, 1, channel=keyed)


def _id_strings(prefix: str, values: np.ndarray, width: int, base: int = 10) -> pa.Array:
    """``prefix`` + zero-padded ``values`` in ``base`` as a string array, built from buffers."""
    n, v = len(values), values.astype(np.uint64)
    digits = np.empty((n, width), dtype=np.uint8)
    alphabet = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    for k in range(width - 1, -1, -1):
        digits[:, k] = alphabet[v % np.uint64(base)]
        v = v // np.uint64(base)
    head = np.broadcast_to(np.frombuffer(prefix.encode(), np.uint8), (n, len(prefix)))
    data = np.ascontiguousarray(np.concatenate([head, digits], axis=1))
    offsets = np.arange(0, (n + 1) * data.shape[1], data.shape[1], dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _finish(rng: np.random.Generator, r: _Rows, m: _Merchants,
            cards: _Cards) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Channels, amounts in local currency, and labels with a little noise."""
    n = len(r.card)
    channel = np.where(r.channel >= 0, r.channel, m.channel[r.merchant])
    tap = (channel == _POS) & (r.amount_eur <= 50) & (rng.random(n) < cards.contactless[r.card])
    channel = np.where(tap, _CONTACTLESS, channel)
    phoned = np.isin(_MCC[m.mcc[r.merchant]], (7011, 4511, 4121)) & (channel != _ECOM)
    channel = np.where(phoned & (rng.random(n) < 0.1), _MOTO, channel)  # phone bookings
    label, noise = r.label.copy(), rng.random(n)  # missed fraud, "friendly" fraud online
    label[(label == 1) & (noise < 0.02)] = 0
    label[(label == 0) & (channel == _ECOM) & (noise > 0.9992)] = 1
    country = m.country[r.merchant]
    local = np.maximum(r.amount_eur, 0.01) * _FX[country]
    step = 10.0 ** np.floor(np.log10(_FX[country] * 20))  # ATMs pay out round sums
    local = np.where(channel == _ATM, np.maximum(step, np.round(local / step) * step), local)
    amount = np.maximum(np.round(local * _MINOR[country]) / _MINOR[country], 0.01)
    return channel, amount, label


def generate(
    rows: int, *, seed: int = 0, start: datetime | None = None, days: float | None = None
) -> pa.Table:
    """Generate ``rows`` labelled transactions, sorted by ``event_time``.

    ``start`` (naive means UTC) defaults to :data:`DEFAULT_START` and ``days`` to
    :data:`DEFAULT_DAYS`; the number of cards (``rows // 40``) and merchants
    (``rows // 100``, at least a few hundred) scale with ``rows``, so each card has a
    history of about 40 transactions whatever the size. Fraud is about 1% of rows.
    """
    if not 0 <= rows <= MAX_ROWS:
        raise ValueError(f"rows must be in [0, {MAX_ROWS}], got {rows}")
    days = DEFAULT_DAYS if days is None else float(days)
    if not days > 0:
        raise ValueError(f"days must be > 0, got {days}")
    start = DEFAULT_START if start is None else start
    start = start if start.tzinfo else start.replace(tzinfo=UTC)
    start_ms, span_s = round(start.timestamp() * 1000), days * _DAY_S

    rng = np.random.Generator(np.random.PCG64(seed))
    m = _Merchants.build(rng, max(300, rows // 100))
    cards = _Cards.build(rng, max(20, rows // 40), m, span_s)
    world = _World(rng, m, cards, span_s, start_ms / 1000)
    fraud = [  # about 0.35% + 0.45% + 0.25% of rows
        _card_testing(world, round(rows * 0.0035 / 17.5)),
        _account_takeover(world, round(rows * 0.0045 / 5)),
        _compromised_merchants(world, round(rows * 0.0025)),
    ]
    n_fraud = min(sum(len(f.card) for f in fraud), rows // 10)
    parts = [_legit(world, rows - n_fraud), *fraud]
    r = _Rows(*(np.concatenate([getattr(p, f) for p in parts])[:rows] for f in _Rows.__slots__))

    channel, amount, label = _finish(rng, r, m, cards)
    country = m.country[r.merchant]
    t_ms = start_ms + np.floor(r.t_s % span_s * 1000).astype(np.int64)  # episodes wrap around
    order = np.lexsort((np.arange(rows), t_ms))  # ties: generation order

    tx_key = (
        np.arange(rows, dtype=np.uint64) * np.uint64(0x9E3779B97F4B)
        + np.uint64(rng.integers(0, 2**48))
    ) & np.uint64(2**48 - 1)  # bijective scramble, so ids do not leak the row order
    n_cards, n_merch = len(cards.home), len(m.mcc)
    ctry_names, cur_names, chan_names = (pa.array(v) for v in (_CTRY, _CURRENCY, CHANNELS))
    card, merchant = r.card[order], r.merchant[order]
    columns = [
        _id_strings("tx-", tx_key, 12, base=16),
        pc.take(_id_strings("card-", np.arange(n_cards), max(6, len(str(n_cards)))), card),
        pc.take(_id_strings("m-", np.arange(n_merch), max(5, len(str(n_merch)))), merchant),
        pa.array(_MCC[m.mcc[merchant]], pa.int32()),
        pa.array(amount[order], pa.float64()),
        pc.take(cur_names, country[order]),
        pc.take(ctry_names, country[order]),
        pc.take(ctry_names, cards.home[card]),
        pc.take(chan_names, channel[order]),
        pa.array(t_ms[order], pa.timestamp("ms", tz="UTC")),
        pa.array(label[order], pa.int8()),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def write(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` atomically as Parquet (``.parquet``) or CSV (``.csv``).

    CSV holds ``event_time`` as ISO-8601 UTC text (``2026-01-01T00:00:00.000Z``).
    See :func:`riskwire.pipeline.data.write_table`.
    """
    return write_table(table, path)
