"""Regenerate the pre-encoded h2load request bodies in ``perf/h2load/``, or verify them.

Each ``.body`` file is one gRPC-framed request message (``0x00`` + 4-byte big-endian
length + protobuf), exactly what h2load sends with ``-d``:

* ``score.body`` — ``riskwire.v1.ScoreRequest``, one synthetic transaction;
* ``score_batch.body`` — ``riskwire.v1.ScoreBatchRequest`` of 256 transactions;
* ``model_infer.body`` — single-row ``inference.ModelInferRequest`` for model ``fraud``
  with raw little-endian contents, like perf_analyzer sends.

The transactions come from ``perf/loadgen.py`` (``sample_transactions``: synthetic
rows, ``event_time_ms = 0`` = server time), the same helpers the serving benchmark
uses, so the bytes are deterministic.

    python perf/h2load/make_bodies.py [--out DIR]     # write the bodies
    python perf/h2load/make_bodies.py --check         # exit 1 when a body is stale
    python perf/h2load/make_bodies.py --verify 127.0.0.1:50051

``--verify`` sends every body's message with a real gRPC call and checks the answer:
h2load counts any HTTP 200 as a success, and gRPC errors travel as HTTP 200 too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf import loadgen  # noqa: E402

BATCH_ROWS = 256
# body file → (method path, request message type)
BODIES = {
    "score.body": (loadgen.SCORE, "riskwire.v1.ScoreRequest"),
    "score_batch.body": (loadgen.SCORE_BATCH, "riskwire.v1.ScoreBatchRequest"),
    "model_infer.body": (loadgen.MODEL_INFER, "inference.ModelInferRequest"),
}


def build() -> dict[str, bytes]:
    """Body file name → framed bytes."""
    txs = loadgen.sample_transactions(BATCH_ROWS)
    return {
        "score.body": loadgen.grpc_frame(loadgen.score_request(txs[0])),
        "score_batch.body": loadgen.grpc_frame(loadgen.score_batch_request(txs[:BATCH_ROWS])),
        "model_infer.body": loadgen.grpc_frame(loadgen.model_infer_request(txs[1])),
    }


def write(out: Path, bodies: dict[str, bytes]) -> None:
    """Write every body under ``out`` (temporary file + rename)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(body)
        tmp.replace(out / name)


def verify(target: str, directory: Path) -> list[str]:
    """Send each body on ``directory`` with a real call; the problems found (empty: all OK)."""
    import grpc

    from riskwire.protos import inference_pb2, scoring_pb2

    problems = []
    for name, (path, _) in BODIES.items():
        try:
            message = loadgen.grpc_unframe((directory / name).read_bytes())
            raw = loadgen.unary_raw(target, path, message, timeout=10.0)
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        except grpc.RpcError as exc:
            problems.append(f"{name}: {path} failed: {exc.code().name}: {exc.details()}")
            continue
        if path == loadgen.SCORE:
            score = scoring_pb2.ScoreResponse.FromString(raw)
            ok = not score.HasField("error") and 0.0 <= score.probability <= 1.0
        elif path == loadgen.SCORE_BATCH:
            results = scoring_pb2.ScoreBatchResponse.FromString(raw).results
            ok = len(results) == BATCH_ROWS and not any(r.HasField("error") for r in results)
        else:
            outputs = [o.name for o in inference_pb2.ModelInferResponse.FromString(raw).outputs]
            ok = "probability" in outputs
        print(f"{name}: {path} {'OK' if ok else 'BAD ANSWER'} ({len(raw) + 5} response bytes)")
        if not ok:
            problems.append(f"{name}: {path} answered without a valid score")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Entry point: write (default), ``--check`` or ``--verify HOST:PORT``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory of the bodies")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--verify", metavar="HOST:PORT", help="send every body to a server")
    args = parser.parse_args(argv)
    if args.verify:
        problems = verify(args.verify, args.out)
        for problem in problems:
            print(f"FAILED {problem}", file=sys.stderr)
        return 1 if problems else 0
    bodies = build()
    if args.check:
        stale = [n for n, b in bodies.items() if _read(args.out / n) != b]
        for name in stale:
            print(
                f"{args.out / name} is stale: run python perf/h2load/make_bodies.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    write(args.out, bodies)
    for name, body in bodies.items():
        print(f"{args.out / name} ({len(body)} bytes)")
    return 0


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
