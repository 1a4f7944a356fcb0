"""Regenerate the ghz request data in ``perf/ghz/data/`` from the synthetic generator.

The data are 64 consecutive transactions of ``riskwire.pipeline.synth.generate(640,
seed=2026)``: 17 distinct cards with 1 to 8 payments each (so per-card state is read
and updated on every call), four channels, and one injected fraud. ``event_time_ms`` is
0 everywhere, which means "the time the server received it": replaying the same
messages over and over keeps every card's history in time order.

Files (each a JSON array; ghz sends the messages of an array round-robin for unary
calls, and the whole array as one stream for streaming calls):

* ``score.json`` — 64 ``riskwire.v1.ScoreRequest`` (``Score`` and ``ScoreStream``);
* ``score_batch.json`` — 4 ``riskwire.v1.ScoreBatchRequest`` of 16 transactions each;
* ``model_infer.json`` — 64 single-row ``inference.ModelInferRequest`` for model
  ``fraud`` with typed ``contents`` (BYTES elements are base64, as proto3 JSON has it).

Field names are the .proto names, which ghz (and grpcurl) accept as well as camelCase.

    python perf/ghz/make_data.py [--out DIR] [--check]

``--check`` regenerates in memory and exits 1 when a committed file differs.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
SEED = 2026
GENERATED_ROWS = 640  # the generator scales cards with rows: 640 rows ~ 16 cards
ROWS = 64
BATCH_ROWS = 16
MODEL = "fraud"
# riskwire.v1.Transaction fields, in .proto order (label and event_time are dropped).
FIELDS = (
    "transaction_id", "card_id", "merchant_id", "mcc", "amount", "currency", "country",
    "card_country", "channel", "event_time_ms",
)  # fmt: skip
# ModelInferRequest inputs: (name, datatype, InferTensorContents field), in the order of
# riskwire.server.grpc.tensors.INPUTS (tests/perf/test_kits.py checks that they agree).
TENSORS = (
    ("transaction_id", "BYTES", "bytes_contents"),
    ("card_id", "BYTES", "bytes_contents"),
    ("merchant_id", "BYTES", "bytes_contents"),
    ("mcc", "INT32", "int_contents"),
    ("amount", "FP64", "fp64_contents"),
    ("currency", "BYTES", "bytes_contents"),
    ("country", "BYTES", "bytes_contents"),
    ("card_country", "BYTES", "bytes_contents"),
    ("channel", "BYTES", "bytes_contents"),
    ("event_time_ms", "INT64", "int64_contents"),
)


def transactions() -> list[dict[str, Any]]:
    """The 64 transactions, as ``riskwire.v1.Transaction`` field dicts (server time)."""
    from riskwire.pipeline import synth

    rows = synth.generate(GENERATED_ROWS, seed=SEED).slice(0, ROWS).to_pylist()
    txs = []
    for row in rows:
        tx = {name: row[name] for name in FIELDS if name != "event_time_ms"}
        tx["event_time_ms"] = 0  # 0 = the server's receive time
        txs.append(tx)
    return txs


def score_requests(txs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ScoreRequest per transaction (default model, default reason codes)."""
    return [{"transaction": tx} for tx in txs]


def score_batch_requests(txs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ScoreBatchRequests of ``BATCH_ROWS`` consecutive transactions."""
    return [
        {"transactions": txs[start : start + BATCH_ROWS]}
        for start in range(0, len(txs), BATCH_ROWS)
    ]


def _contents(datatype: str, value: Any) -> list[Any]:
    if datatype == "BYTES":
        return [base64.b64encode(str(value).encode()).decode("ascii")]
    return [value]


def model_infer_requests(txs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Single-row ModelInferRequests (shape [1, 1], like perf_analyzer's) with typed contents."""
    return [
        {
            "model_name": MODEL,
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": [1, 1],
                    "contents": {field: _contents(datatype, tx[name])},
                }
                for name, datatype, field in TENSORS
            ],
        }
        for tx in txs
    ]


def render(messages: list[dict[str, Any]]) -> str:
    """A JSON array with one message per line (diffable, small, stable)."""
    lines = ",\n".join("  " + json.dumps(message, ensure_ascii=False) for message in messages)
    return "[\n" + lines + "\n]\n"


def build() -> dict[str, str]:
    """File name → content of every data file."""
    txs = transactions()
    return {
        "score.json": render(score_requests(txs)),
        "score_batch.json": render(score_batch_requests(txs)),
        "model_infer.json": render(model_infer_requests(txs)),
    }


def write(out: Path, files: dict[str, str]) -> None:
    """Write every file under ``out`` (temporary file + rename: never half-written)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the data (default ``perf/ghz/data``) or ``--check`` it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        stale = [name for name, text in files.items() if _read(args.out / name) != text]
        for name in stale:
            print(f"{args.out / name} is stale: run python perf/ghz/make_data.py", file=sys.stderr)
        return 1 if stale else 0
    write(args.out, files)
    for name in files:
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
