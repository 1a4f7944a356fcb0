"""Output validation: an impossible probability never reaches a client as an answer."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest

from riskwire.kernels.state import CardStateTable
from riskwire.server.dataplane import DataPlane
from riskwire.server.errors import OutputValidationError
from riskwire.server.registry import ModelRegistry
from riskwire.server.state import LocalCardState
from riskwire.server.validation import OUTPUT_INVALID, PolicyConfig, ValidationPolicy

ROW = dict(
    card_id="c-1", merchant_id="m-1", mcc=5411, amount=10.0, currency="EUR", country="DE",
    card_country="DE", channel="pos", event_time_ms=1_767_225_600_000, top_reasons=0,
)  # fmt: skip


class BrokenForest:
    """Returns a probability no sigmoid can produce."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict_row(self, row: np.ndarray) -> float:
        return self.value


def broken_model(models_dir, value: float):  # noqa: ANN001, ANN201
    registry = ModelRegistry(models_dir, "fraud")
    runtime = registry.load_all()[0]
    package = SimpleNamespace(**vars(runtime.package) | {"forest": BrokenForest(value)})
    return registry, dataclasses.replace(runtime, package=package)


@pytest.mark.parametrize("value", [1.5, -0.1, math.nan, math.inf])
def test_invalid_output_is_internal_by_default(models_dir, value: float) -> None:
    registry, model = broken_model(models_dir, value)
    policy = ValidationPolicy(PolicyConfig())
    plane = DataPlane(registry, LocalCardState(CardStateTable.create(64)), policy=policy)
    with pytest.raises(OutputValidationError, match="outside \\[0, 1\\]"):
        plane.score_one(model, **ROW)
    assert policy.counts["output_invalid"] == 1


def test_failsafe_decision_is_flagged_and_counted(models_dir) -> None:
    registry, model = broken_model(models_dir, 7.0)
    policy = ValidationPolicy(PolicyConfig(), output_failsafe="review")
    plane = DataPlane(registry, LocalCardState(CardStateTable.create(64)), policy=policy)
    outcome = plane.score_one(model, **ROW)
    assert outcome.decision == "review" and math.isnan(outcome.probability)
    assert outcome.flags == (OUTPUT_INVALID,)
    assert policy.counts["output_invalid"] == 1
