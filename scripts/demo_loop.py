"""The maintenance loop end to end, on this machine, in a few minutes (``make demo-loop``):

    synth traffic → build the champion → serve → shadow a challenger → live traffic →
    labels (late chargebacks + reviewers) → export → retrain → compare → canary → promote

Every step is the ``riskwire`` command a team would run (printed before it runs), against
a real server on free loopback ports; the "live" traffic and the truth behind the labels
come from the synthetic generator. The retrained model is promoted only when
``riskwire compare`` says it is better than the champion on a holdout; otherwise the
canary is stopped and the champion stays.

    python scripts/demo_loop.py [--work DIR] [--history-rows N] [--live-rows N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from riskwire.net import free_port

MODEL = "fraud"
DAY_MS = 86_400_000
BATCH_ROWS = 500
BUILD_CONFIG = """# demo builds: fewer, smaller trees; promotion gated by `riskwire compare` here
num_boost_round = {rounds}
early_stopping_rounds = 30
risk_category = "low"
owner = "demo"
"""


def main(argv: list[str] | None = None) -> int:
    """Run the loop; returns 0 when every step succeeded (whatever the verdict)."""
    args = _parser().parse_args(argv)
    work = Path(args.work).resolve()
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(work, quiet=args.json)
    outcome = demo.run(args)
    if args.json:
        print(json.dumps(outcome))
    return 0


class Demo:
    """The steps, sharing one work directory, server and admin port."""

    def __init__(self, work: Path, *, quiet: bool) -> None:
        self.work = work
        self.models = work / "models"
        self.shadow = self.models / ".shadow"
        self.quiet = quiet
        self.server: subprocess.Popen | None = None
        self.port = self.admin_port = 0

    # ------------------------------------------------------------------ the loop
    def run(self, args: argparse.Namespace) -> dict:
        config = self.work / "build.toml"
        config.write_text(BUILD_CONFIG.format(rounds=args.rounds))
        self.step("1. Synthetic data: history (training), live traffic, holdout")
        history = self.synth("history", args.history_rows, seed=11, start=datetime(2026, 1, 1))
        challenger_data = self.synth("challenger", args.history_rows, 12, datetime(2026, 2, 1))
        live = self.synth("live", args.live_rows, seed=13, start=datetime(2026, 3, 1))
        holdout = self.synth("holdout", args.holdout_rows, seed=14, start=datetime(2026, 5, 1))

        self.step("2. Build the champion (v1) and serve it")
        self.cli("build", "--data", history, "--name", MODEL, "--config", config, *self.at_models)
        self.start_server(args.review_percent)
        try:
            self.step("3. Build a challenger (v2) and mirror all of v1's traffic to it")
            self.cli("build", "--data", challenger_data, "--name", MODEL, "--config", config,
                     "--parent", f"{MODEL}/1", *self.at_models)  # fmt: skip
            self.cli("models", "load", MODEL, "2", *self.admin)
            self.cli("shadow", "set", "--version", "2", "--rate", "100", *self.admin)

            self.step("4. Live traffic (ScoreBatch and Score), logged with features as served")
            self.replay(live)

            self.step("5. Labels: chargebacks for the matured part, reviewers for the rest")
            cutoff = self.send_chargebacks(live, matured_fraction=0.7)
            reviewed = self.review_cases(live)

            self.step("6. Export training data: logged requests joined with their labels")
            train = self.work / "train.parquet"
            exported = json.loads(
                self.cli("data", "export", "--models", self.models, "--out", train, "--json")
            )

            self.step("7. Retrain on production data (v3, parent v1)")
            self.cli("build", "--data", train, "--name", MODEL, "--config", config,
                     "--parent", f"{MODEL}/1", *self.at_models)  # fmt: skip

            self.step("8. Compare champion v1 and challenger v3 on the holdout")
            comparison = json.loads(
                self.cli(
                    "compare",
                    MODEL,
                    "1",
                    "3",
                    "--data",
                    holdout,
                    "--models",
                    self.models,
                    "--bootstrap",
                    str(args.bootstrap),
                    "--json",
                )  # fmt: skip
            )
            self.cli("compare", MODEL, "1", "3", "--data", holdout, "--models", self.models,
                     "--bootstrap", str(args.bootstrap))  # fmt: skip
            verdict = comparison["verdict"]

            self.step(f"9. Canary v3 on 20% of cards, then decide ({verdict})")
            self.cli("models", "load", MODEL, "3", *self.admin)
            self.cli("models", "canary", MODEL, "3", "--weight", "20", *self.admin)
            self.replay(holdout, limit=2000)
            promoted = verdict == "challenger better"
            if promoted:
                self.cli("models", "promote", MODEL, "3", *self.admin)
            else:
                self.cli("models", "canary", MODEL, "--stop", *self.admin)
            listing = self.cli("models", "list", *self.admin)
            self.step("10. Shadow report of v1 vs v2 on the labelled live traffic")
            report = self.work / "shadow-report.html"
            self.cli("shadow", "report", "--models", self.models, "--out", report)
        finally:
            self.stop_server()
        return {
            "work": str(self.work),
            "chargeback_cutoff": cutoff,
            "reviewed_cases": reviewed,
            "exported": exported,
            "verdict": verdict,
            "promoted": promoted,
            "primary": _primary_of(listing),
            "comparison": {k: comparison[k] for k in ("verdict",) if k in comparison},
        }

    # ------------------------------------------------------------------ steps
    def synth(self, name: str, rows: int, seed: int, start: datetime) -> Path:
        """Synthetic transactions (with their truth) starting at ``start``."""
        from riskwire.pipeline.data import write_table
        from riskwire.pipeline.synth import generate

        path = self.work / f"{name}.parquet"
        write_table(generate(rows, seed=seed, start=start.replace(tzinfo=UTC), days=30), path)
        self.say(f"   {path.name}: {rows} rows from {start:%Y-%m-%d}")
        return path

    def start_server(self, review_percent: float) -> None:
        """``riskwire serve`` on free loopback ports; waits for SERVING."""
        self.port, self.admin_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RISKWIRE_")}
        env.update(
            RISKWIRE_ADMIN_PORT=str(self.admin_port),
            RISKWIRE_METRICS_PORT=str(free_port()),
            RISKWIRE_WORKERS="2",
            RISKWIRE_REVIEW_SAMPLE_PERCENT=str(review_percent),
            RISKWIRE_PREDICTION_LOG_RATE="100",  # every answer: more rows to retrain on
            RISKWIRE_SHADOW_FLUSH_SECONDS="1",
            RISKWIRE_LOG_LEVEL="WARNING",
        )
        command = [*_riskwire(), "serve", "--models", str(self.models), "--port", str(self.port)]
        self.say("$ " + " ".join(command[2:]))
        log = open(self.work / "server.log", "w")  # noqa: SIM115 - the server's lifetime
        self.server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_serving(f"127.0.0.1:{self.port}", self.server, self.work / "server.log")

    def stop_server(self) -> None:
        """SIGTERM: the workers drain and flush the prediction log and review sink."""
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(60)
            except subprocess.TimeoutExpired:
                self.server.kill()
        self.server = None

    @property
    def at_models(self) -> tuple[str, str]:
        return ("--models", str(self.models))

    @property
    def admin(self) -> tuple[str, str]:
        return ("--admin", f"127.0.0.1:{self.admin_port}")

    def replay(self, path: Path, *, limit: int | None = None) -> None:
        """Send the file's transactions in time order: the first 200 one by one (Score),
        the rest in batches (ScoreBatch)."""
        from riskwire.clients.client import RiskwireClient

        rows = _transactions(pq.read_table(path), limit)
        with RiskwireClient(f"127.0.0.1:{self.port}", timeout_s=30.0) as client:
            for transaction in rows[:200]:
                client.score(transaction)
            for start in range(200, len(rows), BATCH_ROWS):
                client.score_batch(rows[start : start + BATCH_ROWS])
        self.say(f"   scored {len(rows)} transactions from {path.name}")

    def send_chargebacks(self, live: Path, *, matured_fraction: float) -> str:
        """Labels for the oldest ``matured_fraction`` of the live window: fraud as a
        chargeback 20-60 days later, legitimate once matured (60 days); sent with
        ``riskwire feedback``. Returns the cutoff time."""
        table = pq.read_table(live, columns=["transaction_id", "event_time", "label"])
        times = table["event_time"].cast(pa.int64()).to_numpy()
        cutoff = int(np.quantile(times, matured_fraction))
        matured = table.filter(pc.less(table["event_time"].cast(pa.int64()), cutoff))
        rng = np.random.default_rng(5)
        fraud = matured["label"].to_numpy() == 1
        delay = np.where(fraud, rng.uniform(20, 60, len(fraud)), 60.0) * DAY_MS
        labelled_at = matured["event_time"].cast(pa.int64()).to_numpy() + delay.astype(np.int64)
        labels = pa.table(
            {
                "transaction_id": matured["transaction_id"],
                "label": matured["label"],
                "labelled_at_ms": pa.array(labelled_at, pa.int64()),
            }
        )
        path = self.work / "chargebacks.parquet"
        pq.write_table(labels, path)
        self.cli("feedback", path, "--target", f"127.0.0.1:{self.port}")
        return datetime.fromtimestamp(cutoff / 1000, UTC).isoformat()

    def review_cases(self, live: Path) -> int:
        """Reviewers work the queue with the truth: two cases through the CLI as a person
        would, the rest through the queue's API (a reviewers' tool), then ``review sync``."""
        from riskwire.server.review import ReviewQueue

        time.sleep(1.5)  # the workers' review sinks write every half second
        truth = dict(
            zip(*pq.read_table(live, columns=["transaction_id", "label"]).to_pydict().values(),
                strict=True)
        )  # fmt: skip
        env = {"RISKWIRE_REVIEWER": "analyst-1"}
        done = 0
        for _ in range(2):
            shown = json.loads(self.cli("review", "next", "--models", self.models, "--json",
                                        env=env))  # fmt: skip
            if shown is None:
                break
            case = shown["case"]
            verdict = "--fraud" if truth.get(case["transaction_id"]) == 1 else "--legit"
            self.cli("review", "label", str(case["case_id"]), verdict, "--models", self.models,
                     "--note", "demo", env=env)  # fmt: skip
            done += 1
        queue = ReviewQueue(self.shadow / "review.sqlite")
        try:
            while (case := queue.lease_next("analyst-2")) is not None:
                queue.label(case.case_id, int(truth.get(case.transaction_id, 0)), "analyst-2")
                done += 1
        finally:
            queue.close()
        self.cli("review", "sync", "--models", self.models)
        self.cli("review", "stats", "--models", self.models)
        return done

    # ------------------------------------------------------------------ output
    def cli(self, *args: object, env: dict[str, str] | None = None) -> str:
        """Run ``riskwire ARGS``; returns its stdout (echoed unless --json)."""
        words = [str(a) for a in args]
        self.say("$ riskwire " + " ".join(words))
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RISKWIRE_")}
        result = subprocess.run(
            [*_riskwire(), *words], env={**clean, **(env or {})}, capture_output=True,
            text=True, timeout=900, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(
                f"riskwire {' '.join(words)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        if "--json" not in words:
            self.say(_indent(result.stdout))
        return result.stdout

    def step(self, title: str) -> None:
        self.say(f"\n== {title}")

    def say(self, text: str) -> None:
        if not self.quiet and text:
            print(text, flush=True)


def _riskwire() -> list[str]:
    return [sys.executable, "-m", "riskwire.clients.cli"]


def _transactions(table: pa.Table, limit: int | None) -> list[dict]:
    """Rows as Score transactions (event_time → event_time_ms; no label)."""
    if limit is not None:
        table = table.slice(0, limit)
    times = table["event_time"].cast(pa.int64()).to_pylist()
    names = ("transaction_id", "card_id", "merchant_id", "mcc", "amount", "currency",
             "country", "card_country", "channel")  # fmt: skip
    columns = {name: table[name].to_pylist() for name in names}
    return [
        {**{name: columns[name][i] for name in names}, "event_time_ms": times[i]}
        for i in range(table.num_rows)
    ]


def _wait_serving(target: str, process: subprocess.Popen, log: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 180
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited:\n{log.read_text()[-4000:]}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not become ready:\n{log.read_text()[-4000:]}")
            time.sleep(0.3)


def _primary_of(listing: str) -> str:
    """The primary version from ``riskwire models list`` output (best effort)."""
    for line in listing.splitlines():
        if "primary" in line:
            return line.strip()
    return ""


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.rstrip().splitlines())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="demo-loop", help="work directory (wiped first)")
    parser.add_argument("--keep", action="store_true", help="do not wipe --work first")
    parser.add_argument("--history-rows", type=int, default=60_000)
    parser.add_argument("--live-rows", type=int, default=120_000)
    parser.add_argument("--holdout-rows", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=300, help="boosting rounds per build")
    parser.add_argument("--bootstrap", type=int, default=500, help="compare's resamples")
    parser.add_argument(
        "--review-percent", type=float, default=5.0, help="non-review decisions sampled"
    )
    parser.add_argument("--json", action="store_true", help="print only a JSON summary")
    return parser


if __name__ == "__main__":
    sys.exit(main())
