"""card.md: the model card written into every package."""

from __future__ import annotations

from typing import Any

from riskwire.kernels.schema import NUM_FEATURES

# What each risk category means for promotion to primary or canary (one line each).
RISK_MEANINGS = {
    "low": "may be promoted to primary or canary directly.",
    "medium": "promotion to primary or canary needs the pre-production checklist "
    "(`riskwire governance check`) to pass.",
    "high": "promotion to primary or canary needs the pre-production checklist and a "
    "recorded approval (`riskwire governance approve`).",
}

_TEMPLATE = """# Model card: {name} v{version}

## Intended use
Real-time scoring of card payments for fraud risk. The model returns a probability
that a transaction is fraudulent; riskwire maps it to a decision with the thresholds
below. It supports, and does not replace, human review: `review` decisions go to an
analyst, `decline` decisions should be explainable to the cardholder on request.

- **Risk category:** {risk_category}: {risk_meaning}
- **Owner:** {owner}
- **Users:** payment and checkout services calling riskwire over gRPC.

## Model
LightGBM binary classifier on {num_features} features (stateless transaction fields and
per-card history: decayed counts and amounts over 1 h / 24 h / 7 d, time since the
previous payment, amount relative to the card's usual, new merchant and country flags).
Served by riskwire's compiled forest kernel, which reproduces LightGBM's raw scores
within 1e-9.

## Data
{lineage_line}Training data SHA-256 `{data_sha256}`. Time-ordered split (no shuffling: the model is
always evaluated on payments later than those it learned from):

| split | rows | first event | last event |
|---|---:|---|---|
{split_rows}

## Evaluation (test split)
| metric | value |
|---|---:|
| ROC AUC | {roc_auc:.4f} |
| PR AUC (average precision) | {pr_auc:.4f} |
| recall at 1% false-positive rate | {recall:.4f} |
| Brier score | {brier:.5f} |
| fraud rate | {fraud_rate:.4%} |

## Decisions
| decision | score | test recall | test false-positive rate | test precision |
|---|---:|---:|---:|---:|
| review or worse | ≥ {review:.6f} | {rv_recall:.3f} | {rv_fpr:.4f} | {rv_precision:.3f} |
| decline | ≥ {decline:.6f} | {dc_recall:.3f} | {dc_fpr:.4f} | {dc_precision:.3f} |

Thresholds were chosen on the validation split so that {review_target:.2%} of legitimate
payments go to review or worse and {decline_target:.2%} are declined.

## Limitations
- Trained on the data above only; fraud patterns change. Watch the drift monitors (input,
  feature and score distributions against profile.json) and the delayed-label metrics.
- Per-card features need the card's history: the first payments of a card carry less
  signal, and restoring the server without its state snapshot degrades them.
- Card ids are hashed before use; no personal data is stored in the package.
- Probabilities are calibrated to the training fraud rate; see metrics.json for the
  calibration table before using them as absolute risk.
"""


def render_card(
    *,
    name: str,
    version: int,
    metrics: dict[str, Any],
    thresholds: dict[str, Any],
    split: dict[str, Any],
    data_sha256: str,
    risk_category: str = "high",
    owner: str = "fraud-risk ML team",
    lineage: dict[str, Any] | None = None,
) -> str:
    """Markdown model card for one package (deterministic: no timestamps).

    ``risk_category`` (low | medium | high) and ``owner`` come from the build config; the
    card says what the category means for promotion. ``lineage`` (metadata.json's) adds
    a line naming the parent model when there is one.
    """
    if risk_category not in RISK_MEANINGS:
        raise ValueError(f"risk_category must be one of {', '.join(RISK_MEANINGS)}")
    test = metrics["test"]
    at = test["at_thresholds"]
    split_rows = "\n".join(
        f"| {part} | {info['rows']} | {info['first_event_time']} | {info['last_event_time']} |"
        for part, info in split.items()
    )
    return _TEMPLATE.format(
        name=name,
        version=version,
        risk_category=risk_category,
        risk_meaning=RISK_MEANINGS[risk_category],
        owner=owner,
        num_features=NUM_FEATURES,
        data_sha256=data_sha256,
        lineage_line=_lineage_line(lineage),
        split_rows=split_rows,
        roc_auc=test["roc_auc"],
        pr_auc=test["pr_auc"],
        recall=test["recall_at_1pct_fpr"],
        brier=test["brier"],
        fraud_rate=test["fraud_rate"],
        review=thresholds["review"],
        decline=thresholds["decline"],
        rv_recall=at["review_or_worse"]["recall"],
        rv_fpr=at["review_or_worse"]["false_positive_rate"],
        rv_precision=at["review_or_worse"]["precision"],
        dc_recall=at["decline"]["recall"],
        dc_fpr=at["decline"]["false_positive_rate"],
        dc_precision=at["decline"]["precision"],
        review_target=thresholds["review_fpr_target"],
        decline_target=thresholds["decline_fpr_target"],
    )


def _lineage_line(lineage: dict[str, Any] | None) -> str:
    parent = (lineage or {}).get("parent")
    if not parent:
        return ""
    line = f"Retrained from **{parent['name']} v{parent['version']}**"
    if parent.get("found"):
        window = parent["data_window"]
        line += (
            f" (package manifest SHA-256 `{parent['manifest_sha256']}`, trained on data from "
            f"{window['first_event_time']} to {window['last_event_time']})"
        )
    else:
        line += " (its package was not in the models directory at build time)"
    return line + ".\n"
