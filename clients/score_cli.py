"""``riskwire score`` and ``riskwire score-file``: score from the terminal or a file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FIELD_FLAGS = (
    ("transaction_id", str), ("card_id", str), ("merchant_id", str), ("mcc", int),
    ("amount", float), ("currency", str), ("country", str), ("card_country", str),
    ("channel", str), ("event_time_ms", int),
)  # fmt: skip
SCORE_FILE_CHUNK_ROWS = 512


def add_target_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by score and score-file."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument(
        "--local", action="store_true", help="score in-process from the model package (no server)"
    )
    parser.add_argument(
        "--models",
        default=None,
        help="models directory for --local (default: $RISKWIRE_MODELS or ./models)",
    )
    parser.add_argument("--model", default="", help="model name (default: the server's default)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline, seconds")


def add_score_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``riskwire score``."""
    add_target_args(parser)
    parser.add_argument(
        "--json",
        dest="json_text",
        default=None,
        help="the transaction as a JSON object (fields of riskwire.v1.Transaction)",
    )
    for name, kind in FIELD_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)
    parser.add_argument("--top-reasons", type=int, default=3)


def _scorer(args: argparse.Namespace):  # noqa: ANN202 - RiskwireClient | LocalScorer
    if args.local:
        from riskwire.pipeline.package import models_dir

        from .local import LocalScorer

        return LocalScorer(models_dir(args.models), args.model or "fraud")
    from .client import RiskwireClient, connection_from_env

    return RiskwireClient(args.target, timeout_s=args.timeout, **connection_from_env())


def cmd_score(args: argparse.Namespace) -> int:
    """Score one transaction and print the result as JSON."""
    import grpc

    from riskwire.server.errors import ServingError

    try:
        try:
            transaction: dict[str, Any] = json.loads(args.json_text) if args.json_text else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json is not valid JSON: {exc}") from None
        if not isinstance(transaction, dict):
            raise ValueError("--json must be a JSON object of transaction fields")
        for name, _ in FIELD_FLAGS:
            if getattr(args, name) is not None:
                transaction[name] = getattr(args, name)
        scorer = _scorer(args)
        result = scorer.score(transaction, model=args.model, top_reasons=args.top_reasons)
    except grpc.RpcError as exc:
        print(f"riskwire: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ServingError, ValueError, FileNotFoundError) as exc:
        print(f"riskwire: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0


def _chunks(path: Path, rows_per_chunk: int) -> tuple[int, Iterator[list[dict[str, Any]]]]:
    from riskwire.kernels.schema import MODEL_INPUT_COLUMNS, TIME_COLUMN
    from riskwire.pipeline.data import load_raw

    raw = load_raw(path, require_label=False)
    columns = raw.columns
    names = ["transaction_id", *(c for c in MODEL_INPUT_COLUMNS if c != TIME_COLUMN)]
    total = len(raw)

    def generate() -> Iterator[list[dict[str, Any]]]:
        for start in range(0, total, rows_per_chunk):
            stop = min(start + rows_per_chunk, total)
            chunk = [{name: columns[name][i] for name in names} for i in range(start, stop)]
            for i, row in zip(range(start, stop), chunk, strict=True):
                row["mcc"] = int(row["mcc"])
                row["amount"] = float(row["amount"])
                row["event_time_ms"] = int(columns["event_time"][i])
            yield chunk

    return total, generate()


def cmd_score_file(args: argparse.Namespace) -> int:
    """Score every row of a Parquet/CSV file in time order; write results to --out."""
    import pyarrow as pa

    from riskwire.pipeline.data import write_table

    total, chunks = _chunks(Path(args.input), args.chunk_rows)
    try:
        scorer = _scorer(args)
    except FileNotFoundError as exc:
        print(f"riskwire: error: {exc}", file=sys.stderr)
        return 1
    ids, probabilities, decisions, errors = [], [], [], []
    started = time.perf_counter()
    done = 0
    for chunk in chunks:
        for result in scorer.score_batch(chunk, model=args.model):
            ids.append(result.transaction_id)
            probabilities.append(result.probability if result.error is None else None)
            decisions.append(result.decision or None)
            errors.append(result.error[1] if result.error else None)
        done += len(chunk)
        rate = done / max(time.perf_counter() - started, 1e-9)
        if not args.quiet:
            width = 30
            filled = int(width * done / max(total, 1))
            print(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rows "
                f"{rate:,.0f} rows/s",
                end="",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - started
    if not args.quiet:
        print(file=sys.stderr)
    table = pa.table({
        "transaction_id": pa.array(ids, pa.string()),
        "probability": pa.array(probabilities, pa.float64()),
        "decision": pa.array(decisions, pa.string()),
        "error": pa.array(errors, pa.string()),
    })  # fmt: skip
    write_table(table, args.out)
    failed = sum(e is not None for e in errors)
    print(
        f"scored {done} rows in {elapsed:.1f}s ({done / max(elapsed, 1e-9):,.0f} rows/s), "
        f"{failed} failed; wrote {args.out}"
    )
    return 0 if failed == 0 else 1


def add_score_file_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``riskwire score-file``."""
    parser.add_argument("input", help="transactions (.parquet or .csv, the raw schema)")
    parser.add_argument("--out", required=True, help="results file (.parquet or .csv)")
    add_target_args(parser)
    parser.add_argument("--chunk-rows", type=int, default=SCORE_FILE_CHUNK_ROWS)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
