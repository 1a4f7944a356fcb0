"""Assemble profile.json and schema.json from a build's data, features and scores."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from riskwire.kernels import encoding
from riskwire.kernels.schema import (
    CATEGORICAL_FEATURES,
    CHANNELS,
    COUNTRIES,
    CURRENCIES,
    FEATURE_NAMES,
    MCC_MAX,
)

from .data import RawData
from .profile import categorical_profile, identifier_profile, numeric_profile

if TYPE_CHECKING:
    from .build import Split

_CATEGORICAL_INPUTS = ("mcc", "currency", "country", "card_country", "channel")
_IDENTIFIER_INPUTS = ("card_id", "merchant_id")


def build_profile(
    raw: RawData, features: np.ndarray, scores: np.ndarray, split: Split, *, bins: int
) -> dict[str, Any]:
    """Training profile: raw inputs and features on the train split, scores on validation.

    Scores are profiled on validation because in-sample training scores are optimistic;
    live score drift is compared against what the model does on unseen data.
    """
    train = split.train
    inputs: dict[str, Any] = {"amount": numeric_profile(raw.columns["amount"][train], bins=bins)}
    for name in _CATEGORICAL_INPUTS:
        inputs[name] = categorical_profile(raw.columns[name][train])
    for name in _IDENTIFIER_INPUTS:
        inputs[name] = identifier_profile(raw.columns[name][train])
    hours = (raw.columns["event_time"][train] // 3_600_000) % 24
    inputs["event_hour"] = categorical_profile(hours)
    feature_profiles = {
        name: (
            categorical_profile(features[train, i].astype(np.int64))
            if name in CATEGORICAL_FEATURES
            else numeric_profile(features[train, i], bins=bins)
        )
        for i, name in enumerate(FEATURE_NAMES)
    }
    return {
        "reference": {"inputs": "train", "features": "train", "score": "validation"},
        "inputs": inputs,
        "features": feature_profiles,
        "score": numeric_profile(scores[split.validation], bins=bins),
        "label_rate": {
            "train": float(raw.labels[train].mean()),
            "validation": float(raw.labels[split.validation].mean()),
        },
    }


def build_schema(raw: RawData, train: slice) -> dict[str, Any]:
    """schema.json: every raw input with its type, requiredness, range and categories."""
    amount = raw.columns["amount"][train]

    def observed(name: str) -> list[str]:
        return sorted({str(v) for v in np.unique(raw.columns[name][train])})

    return {
        "time_encoding": "event_time is int64 epoch milliseconds, UTC",
        "unknown_category_code": encoding.UNKNOWN_CODE,
        "inputs": [
            _field("transaction_id", "string", "unique payment id; not a model input"),
            _field("card_id", "string", "card token; hashed (blake2b-64) before use", hashed=True),
            _field("merchant_id", "string", "merchant id; hashed (blake2b-64)", hashed=True),
            _field(
                "mcc",
                "int32",
                "merchant category code",
                range=[0, MCC_MAX],
                observed_categories=observed("mcc"),
            ),
            _field(
                "amount",
                "float64",
                "amount in transaction currency",
                range=[0.0, None],
                training_range=[float(amount.min()), float(amount.max())],
            ),
            _field(
                "currency",
                "string",
                "ISO 4217",
                categories=list(CURRENCIES),
                observed_categories=observed("currency"),
            ),
            _field(
                "country",
                "string",
                "ISO 3166-1 alpha-2 of the merchant",
                categories=list(COUNTRIES),
                observed_categories=observed("country"),
            ),
            _field(
                "card_country",
                "string",
                "ISO 3166-1 alpha-2 of the issuer",
                categories=list(COUNTRIES),
                observed_categories=observed("card_country"),
            ),
            _field(
                "channel",
                "string",
                "payment channel",
                categories=list(CHANNELS),
                observed_categories=observed("channel"),
            ),
            _field("event_time", "int64", "epoch milliseconds UTC"),
        ],
        "features": [
            {"name": name, "categorical": name in CATEGORICAL_FEATURES} for name in FEATURE_NAMES
        ],
        "outputs": [
            {"name": "probability", "dtype": "float64", "range": [0.0, 1.0]},
            {"name": "decision", "dtype": "string", "categories": ["approve", "review", "decline"]},
        ],
    }


def _field(name: str, dtype: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "required": True, "description": description, **extra}
