"""Request validation against the package's schema and training profile, in Numba.

A :class:`ValidationSpec` is compiled once per model version from ``schema.json``: the
amount's training range widened by a tolerance, the MCC schema range, and for every
categorical input the codes seen in training. The kernels return a bit mask of
violated checks per row; the server maps bits to its per-check policy
(reject / flag / ignore). Empty ids, non-finite or negative amounts and negative times
are schema errors the server rejects before encoding (they cannot be encoded).

    check bit          kind       meaning
    AMOUNT_RANGE       range      amount outside the widened training range
    MCC_RANGE          schema     mcc outside the schema's [0, 9999]
    MCC_UNSEEN         category   an MCC the model never saw in training
    COUNTRY_UNSEEN     category   merchant country unknown or unseen in training
    CARD_COUNTRY_UNSEEN category  issuer country unknown or unseen in training
    CURRENCY_UNSEEN    category   currency unknown or unseen in training
    CHANNEL_UNSEEN     category   channel unknown or unseen in training
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numba import njit

from .encoding import CHANNEL_CODES, COUNTRY_CODES, CURRENCY_CODES
from .schema import MCC_MAX

AMOUNT_RANGE: Final = 1
MCC_RANGE: Final = 2
MCC_UNSEEN: Final = 4
COUNTRY_UNSEEN: Final = 8
CARD_COUNTRY_UNSEEN: Final = 16
CURRENCY_UNSEEN: Final = 32
CHANNEL_UNSEEN: Final = 64

# bit → (check kind, field, what was expected)
CHECKS: Final = {
    AMOUNT_RANGE: ("range", "amount", "within the training range"),
    MCC_RANGE: ("schema", "mcc", f"an ISO 18245 code in 0..{MCC_MAX}"),
    MCC_UNSEEN: ("category", "mcc", "a merchant category code seen in training"),
    COUNTRY_UNSEEN: ("category", "country", "an ISO 3166-1 alpha-2 code seen in training"),
    CARD_COUNTRY_UNSEEN: (
        "category",
        "card_country",
        "an ISO 3166-1 alpha-2 code seen in training",
    ),
    CURRENCY_UNSEEN: ("category", "currency", "an ISO 4217 code seen in training"),
    CHANNEL_UNSEEN: ("category", "channel", "a channel seen in training"),
}
CHECK_KINDS: Final = ("schema", "range", "category")


@njit(cache=True, nogil=True, inline="always")
def _allowed(table: np.ndarray, code: int) -> bool:
    return 0 <= code < table.shape[0] and table[code]


@njit(cache=True, nogil=True)
def validate_row(
    amount: float,
    mcc: int,
    country: int,
    card_country: int,
    currency: int,
    channel: int,
    amount_lo: float,
    amount_hi: float,
    mcc_seen: np.ndarray,
    country_seen: np.ndarray,
    currency_seen: np.ndarray,
    channel_seen: np.ndarray,
) -> int:
    """Violation bits of one encoded transaction (codes -1 = not in the vocabulary)."""
    mask = 0
    if not (amount_lo <= amount <= amount_hi):
        mask |= AMOUNT_RANGE
    if mcc < 0 or mcc > MCC_MAX:
        mask |= MCC_RANGE
    elif not _allowed(mcc_seen, mcc):
        mask |= MCC_UNSEEN
    if not _allowed(country_seen, country):
        mask |= COUNTRY_UNSEEN
    if not _allowed(country_seen, card_country):
        mask |= CARD_COUNTRY_UNSEEN
    if not _allowed(currency_seen, currency):
        mask |= CURRENCY_UNSEEN
    if not _allowed(channel_seen, channel):
        mask |= CHANNEL_UNSEEN
    return mask


@njit(cache=True, nogil=True)
def validate_rows(
    amount: np.ndarray,
    mcc: np.ndarray,
    country: np.ndarray,
    card_country: np.ndarray,
    currency: np.ndarray,
    channel: np.ndarray,
    amount_lo: float,
    amount_hi: float,
    mcc_seen: np.ndarray,
    country_seen: np.ndarray,
    currency_seen: np.ndarray,
    channel_seen: np.ndarray,
    out: np.ndarray,
) -> int:
    """Violation bits of every row into ``out``; returns the number of rows with any."""
    flagged = 0
    for i in range(amount.shape[0]):
        out[i] = validate_row(
            amount[i], mcc[i], country[i], card_country[i], currency[i], channel[i],
            amount_lo, amount_hi, mcc_seen, country_seen, currency_seen, channel_seen,
        )  # fmt: skip
        if out[i]:
            flagged += 1
    return flagged


def _seen_table(names: Any, codes: Mapping[str, int], size: int) -> np.ndarray:
    table = np.zeros(size, dtype=np.bool_)
    for name in names or ():
        code = codes.get(str(name), -1)
        if code >= 0:
            table[code] = True
    return table


@dataclass(frozen=True)
class ValidationSpec:
    """What a model version accepts, compiled for the kernels."""

    amount_lo: float
    amount_hi: float
    mcc_seen: np.ndarray
    country_seen: np.ndarray
    currency_seen: np.ndarray
    channel_seen: np.ndarray

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any], *, tolerance: float = 0.1) -> ValidationSpec:
        """From a package's ``schema.json``: the amount's training range widened by
        ``tolerance`` × its span on each side (never below 0), categories seen in
        training (``observed_categories``; the vocabulary where none were recorded)."""
        inputs = {column["name"]: column for column in schema["inputs"]}

        def seen(name: str) -> Any:
            column = inputs.get(name, {})
            return column.get("observed_categories") or column.get("categories")

        lo, hi = inputs.get("amount", {}).get("training_range") or (0.0, math.inf)
        span = (hi - lo) if math.isfinite(hi) else 0.0
        mcc_codes = {str(code): code for code in range(MCC_MAX + 1)}
        return cls(
            amount_lo=max(0.0, lo - tolerance * span),
            amount_hi=hi + tolerance * span,
            mcc_seen=_seen_table(seen("mcc"), mcc_codes, MCC_MAX + 1),
            country_seen=_seen_table(seen("country"), COUNTRY_CODES, len(COUNTRY_CODES)),
            currency_seen=_seen_table(seen("currency"), CURRENCY_CODES, len(CURRENCY_CODES)),
            channel_seen=_seen_table(seen("channel"), CHANNEL_CODES, len(CHANNEL_CODES)),
        )

    def row(
        self, amount: float, mcc: int, country: int, card_country: int, currency: int, channel: int
    ) -> int:
        """Violation bits of one encoded transaction."""
        return validate_row(
            amount, mcc, country, card_country, currency, channel, self.amount_lo,
            self.amount_hi, self.mcc_seen, self.country_seen, self.currency_seen,
            self.channel_seen,
        )  # fmt: skip

    def rows(self, tx: Any, mcc: np.ndarray) -> np.ndarray:
        """Violation bits of every row of encoded TransactionArrays (one kernel pass);
        ``mcc`` is the raw MCC column (the encoded one has lost out-of-range values)."""
        out = np.zeros(len(tx.amount), dtype=np.int64)
        validate_rows(
            tx.amount, np.asarray(mcc, dtype=np.int64), tx.country, tx.card_country,
            tx.currency, tx.channel,
            self.amount_lo, self.amount_hi, self.mcc_seen, self.country_seen,
            self.currency_seen, self.channel_seen, out,
        )  # fmt: skip
        return out

    def warmup(self) -> None:
        """Compile (or load from cache) both kernels."""
        self.row(1.0, 5411, 0, 0, 0, 0)
        from .encoding import TransactionArrays

        one = np.zeros(1, np.int32)
        tx = TransactionArrays(
            card_key=np.zeros(1, np.uint64),
            merchant_key=np.zeros(1, np.uint64),
            event_time_ms=np.zeros(1, np.int64),
            amount=np.ones(1),
            mcc=one,
            country=one,
            card_country=one,
            currency=one,
            channel=one,
        )
        self.rows(tx, np.zeros(1, np.int64))


def violations(mask: int) -> list[tuple[str, str, str]]:
    """(check kind, field, expectation) of every bit set in ``mask``."""
    return [check for bit, check in CHECKS.items() if mask & bit]
