"""Regenerate ``perf/perf_analyzer/model_infer.json``, perf_analyzer's ``--input-data``.

The same 64 synthetic transactions (17 cards) as the ghz data (``perf/ghz/make_data.py``),
one single-row step per transaction::

    {"data": [{"transaction_id": ["tx-..."], "card_id": ["card-000008"], ...}, ...]}

Keys are the model's input tensors (``riskwire.server.grpc.tensors.INPUTS``); each
value is the list of elements of one batch row (the model's dims are ``[1]``, so one
element). BYTES inputs are plain strings; ``event_time_ms`` is 0 (server time), so
cycling through the steps keeps every card's history in time order.

    python perf/perf_analyzer/make_input.py [--out FILE] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf.ghz.make_data import TENSORS, transactions  # noqa: E402

OUT = HERE / "model_infer.json"


def steps(txs: list[dict[str, Any]]) -> list[dict[str, list[Any]]]:
    """One perf_analyzer data step (input name → row elements) per transaction."""
    return [{name: [tx[name]] for name, _, _ in TENSORS} for tx in txs]


def render() -> str:
    """The input-data JSON: one step per line inside ``{"data": [...]}``."""
    lines = ",\n".join(
        "    " + json.dumps(step, ensure_ascii=False) for step in steps(transactions())
    )
    return '{\n  "data": [\n' + lines + "\n  ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the file (default ``perf/perf_analyzer/model_infer.json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output file")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            same = args.out.read_text() == text
        except OSError:
            same = False
        if not same:
            print(
                f"{args.out} is stale: run python perf/perf_analyzer/make_input.py", file=sys.stderr
            )
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
