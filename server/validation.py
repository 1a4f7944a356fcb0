"""Per-check validation policy: reject, flag or ignore what ``kernels.validate`` finds.

The kernels report violated checks as bits; the policy turns them into an
InvalidInputError listing every violated field (``reject``), response flags such as
``range:amount`` (``flag``) or nothing (``ignore``), and counts each outcome per
worker. Output validation (probability finite and in [0, 1]) either fails the call
with INTERNAL or, with a configured fail-safe decision, answers that decision flagged
``output:invalid``; both are counted and logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from riskwire.kernels.validate import CHECK_KINDS, CHECKS

from .errors import InvalidInputError

log = logging.getLogger(__name__)

POLICIES = ("reject", "flag", "ignore")
OUTPUT_INVALID = "output:invalid"
_BITS = tuple(CHECKS)


@dataclass(frozen=True)
class PolicyConfig:
    """What to do per check kind (see ``kernels.validate.CHECKS``)."""

    schema: str = "reject"
    range: str = "flag"
    category: str = "flag"

    def __post_init__(self) -> None:
        for kind in CHECK_KINDS:
            if getattr(self, kind) not in POLICIES:
                raise ValueError(
                    f"validation policy for {kind!r} must be one of {', '.join(POLICIES)}, "
                    f"got {getattr(self, kind)!r}"
                )


class ValidationPolicy:
    """Applies a :class:`PolicyConfig` to violation masks and counts the outcomes."""

    def __init__(self, config: PolicyConfig, output_failsafe: str = "") -> None:
        self.config = config
        self.output_failsafe = output_failsafe
        self.reject_mask = self._mask("reject")
        self.flag_mask = self._mask("flag")
        self._flag_names = {
            bit: f"{CHECKS[bit][0]}:{CHECKS[bit][1]}" for bit in _BITS if bit & self.flag_mask
        }
        self._lock = threading.Lock()
        self.counts = {"validated": 0, "flagged": 0, "rejected": 0, "output_invalid": 0}
        self.by_check = dict.fromkeys(self._flag_names.values(), 0)

    def _mask(self, policy: str) -> int:
        mask = 0
        for bit, (kind, _, _) in CHECKS.items():
            if getattr(self.config, kind) == policy:
                mask |= bit
        return mask

    def apply(self, mask: int, values: dict[str, object] | None, prefix: str) -> tuple[str, ...]:
        """Flags for one row's ``mask``; raises InvalidInputError if a check rejects it.

        ``values`` (field → value as received) go into the error message.
        """
        rejected = mask & self.reject_mask
        if rejected:
            with self._lock:
                self.counts["validated"] += 1
                self.counts["rejected"] += 1
            raise self._error(rejected, values, prefix)
        flagged = mask & self.flag_mask
        flags = tuple(name for bit, name in self._flag_names.items() if flagged & bit)
        with self._lock:
            self.counts["validated"] += 1
            if flags:
                self.counts["flagged"] += 1
                for name in flags:
                    self.by_check[name] += 1
        return flags

    def apply_rows(
        self,
        masks: np.ndarray,
        values_of: Callable[[int], dict[str, object]],
        prefix_of: Callable[[int], str],
    ) -> tuple[dict[int, InvalidInputError], dict[int, tuple[str, ...]]]:
        """Errors of the rejected rows and flags of the flagged ones, by row; ``values_of(i)``
        and ``prefix_of(i)`` are asked only for rows with a violation."""
        errors: dict[int, InvalidInputError] = {}
        flags: dict[int, tuple[str, ...]] = {}
        for i in np.flatnonzero(masks).tolist():
            try:
                found = self.apply(int(masks[i]), values_of(i), prefix_of(i))
            except InvalidInputError as exc:
                errors[i] = exc
                continue
            if found:
                flags[i] = found
        clean = len(masks) - int(np.count_nonzero(masks))
        with self._lock:
            self.counts["validated"] += clean
        return errors, flags

    def count_clean(self, rows: int = 1) -> None:
        """Account for rows that violated nothing."""
        with self._lock:
            self.counts["validated"] += rows

    def output_invalid(self, message: str) -> None:
        """Count and log an invalid model output."""
        with self._lock:
            self.counts["output_invalid"] += 1
        log.error("output validation: %s", message)

    @staticmethod
    def _error(mask: int, values: dict[str, object] | None, prefix: str) -> InvalidInputError:
        found = []
        for bit, (kind, field, expected) in CHECKS.items():
            if mask & bit:
                got = f", got {values[field]!r}" if values and field in values else ""
                found.append((f"{prefix}{field}", f"{kind} check: expected {expected}{got}"))
        message = "; ".join(f"{field}: {text}" for field, text in found)
        return InvalidInputError(message, field=found[0][0], violations=found)
