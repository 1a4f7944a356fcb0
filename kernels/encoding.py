"""Encode raw transaction fields into the numeric arrays the kernels take.

Strings become fixed-vocabulary codes (-1 = unknown) or 64-bit keys (blake2b, so the
same id hashes the same in every process, machine and Python version). Key 0 is
reserved for "empty slot" in the state table, so a hash of 0 is remapped to 1.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .schema import CHANNELS, COUNTRIES, CURRENCIES, MCC_MAX

CHANNEL_CODES: dict[str, int] = {name: code for code, name in enumerate(CHANNELS)}
COUNTRY_CODES: dict[str, int] = {name: code for code, name in enumerate(COUNTRIES)}
CURRENCY_CODES: dict[str, int] = {name: code for code, name in enumerate(CURRENCIES)}
UNKNOWN_CODE = -1

_HASH_KEY = b"riskwire-entity-v1"


@functools.lru_cache(maxsize=1 << 16)
def hash64(value: str | bytes) -> int:
    """Stable 64-bit key of an entity id (never 0). Recently seen ids are remembered
    (cards and merchants repeat): a hit costs a tenth of the keyed hash."""
    data = value.encode() if isinstance(value, str) else value
    key = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=_HASH_KEY).digest(), "little")
    return key or 1


def hash_ids(values: Iterable[str | bytes]) -> np.ndarray:
    """Vector of :func:`hash64` keys as uint64."""
    return np.fromiter(map(hash64, values), dtype=np.uint64)


def encode_category(values: Iterable[str], codes: Mapping[str, int]) -> np.ndarray:
    """Codes of a categorical column (int32, -1 for unknown or missing)."""
    return np.fromiter(map(codes.get, values, itertools.repeat(UNKNOWN_CODE)), dtype=np.int32)


@dataclass(frozen=True, slots=True)
class TransactionArrays:
    """A batch of transactions as the feature kernel consumes them (all length n)."""

    card_key: np.ndarray  # uint64
    merchant_key: np.ndarray  # uint64
    event_time_ms: np.ndarray  # int64, epoch milliseconds UTC
    amount: np.ndarray  # float64
    mcc: np.ndarray  # int32, -1 unknown
    country: np.ndarray  # int32
    card_country: np.ndarray  # int32
    currency: np.ndarray  # int32
    channel: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.amount)

    def take(self, index: np.ndarray | slice) -> TransactionArrays:
        """A sub-batch (row selection) with contiguous arrays."""
        return TransactionArrays(
            *(np.ascontiguousarray(getattr(self, f)[index]) for f in self.__slots__)
        )


def encode_mcc(values: Sequence[int] | np.ndarray) -> np.ndarray:
    """MCC codes as int32; out-of-range values become -1."""
    mcc = np.asarray(values, dtype=np.int64)
    return np.where((mcc >= 0) & (mcc <= MCC_MAX), mcc, UNKNOWN_CODE).astype(np.int32)


def encode_columns(columns: Mapping[str, Sequence | np.ndarray]) -> TransactionArrays:
    """Encode raw columns (see :mod:`riskwire.kernels.schema`) into kernel arrays.

    ``event_time`` must already be int64 epoch milliseconds.
    """
    return TransactionArrays(
        card_key=hash_ids(columns["card_id"]),
        merchant_key=hash_ids(columns["merchant_id"]),
        event_time_ms=np.ascontiguousarray(columns["event_time"], dtype=np.int64),
        amount=np.ascontiguousarray(columns["amount"], dtype=np.float64),
        mcc=encode_mcc(columns["mcc"]),
        country=encode_category(columns["country"], COUNTRY_CODES),
        card_country=encode_category(columns["card_country"], COUNTRY_CODES),
        currency=encode_category(columns["currency"], CURRENCY_CODES),
        channel=encode_category(columns["channel"], CHANNEL_CODES),
    )
