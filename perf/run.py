"""riskwire vs MLServer vs FastAPI vs a bare grpcio echo: one run, one machine (``make bench``).

Four servers, the same worker count (one per core), the same LightGBM model:

1. riskwire (``riskwire serve --profile dev``: every setting at its default, as in
   production: the 1M-slot card table, snapshots every 60 s, prediction-log segments
   every 5 s): raw transaction in, validation, features with per-card state, forest,
   decision;
2. MLServer + mlserver-lightgbm (own venv), the best of the configurations tried first
   (``parallel_workers``, adaptive batching; see ``perf/mlserver_peer.py``);
3. FastAPI + LightGBM under uvicorn (own venv, ``perf/fastapi_peer.py``);
4. the bare grpcio echo (``perf/echo_server.py``): the Python gRPC ceiling.

MLServer and FastAPI get the 23 precomputed features and only run ``Booster.predict``:
less work than riskwire does. Load: h2load (unary gRPC ModelInfer with a pre-encoded
single-row body; HTTP/1.1 JSON for the HTTP endpoints) and perf_analyzer (ModelInfer,
where the server implements the ModelConfig RPC it needs) at each concurrency, then
h2load at one fixed rate. All servers run at once; at each point one server is driven
while the others idle (their idle CPU is recorded); the first server rotates per level.
Every endpoint is checked with a real call before and after each run (h2load counts a
gRPC error as HTTP 200), and the peers must answer LightGBM's own probabilities. With
``--repeat N`` the sweep runs N times (the fixed rate too) and each ratio is the median
of the N paired ratios. MLServer configurations are ranked by gRPC ModelInfer req/s at
the first ``--tune-concurrency`` level (8), each measured alone before the main run.

    python perf/run.py [--models DIR] [--duration S] [--concurrency 1,8,32,128]
        [--rate auto|N|off] [--repeat N] [--mlserver-configs 2@1,2:32:0.002@1] [--skip-mlserver]
        [--skip-fastapi] [--smoke [--with-mlserver] [--with-fastapi]] [--json] [--out DIR]

Writes ``results.json``, ``results.csv``, ``plot.png`` and the server logs to ``--out``
(default ``perf/results/run-<timestamp>``); with ``--json`` the last line printed is the
summary object (``throughput_ratio_vs_mlserver``, ``p99_ratio_vs_mlserver``,
``throughput_ratio_vs_echo``, ... at concurrency 8; null where a side was not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``perf`` importable
    sys.path.insert(0, str(REPO))

from perf import fastapi_peer, loadgen, mlserver_peer, plot  # noqa: E402
from perf.fastapi_peer import Server, Target, idle_cpu  # noqa: E402
from perf.mlserver_peer import MLServerConfig  # noqa: E402

SERVER_ORDER = ("riskwire", "mlserver", "fastapi", "echo")


@dataclass
class Point:
    """One measurement of one target at one load."""

    phase: str  # "tune" (MLServer configurations), "main", or "probe"
    server: str
    config: str
    tool: str
    protocol: str
    method: str
    concurrency: int | None
    rate: float | None = None
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    errors: int = 0
    requests: int = 0
    repeat: int = 0
    notes: str = ""
    # CPU of every process of the server under test per request answered, in µs (main
    # phase; the load generator's CPU is not counted): CPU ÷ wall time ÷ req/s over the
    # tool's run, so perf_analyzer's own start-up, counted as wall time, makes it a
    # little low there
    server_cpu_us: float | None = None

    def fail(self, message: str, count: int = 1) -> Point:
        """Count and print an error of this measurement."""
        self.errors += count
        self.notes = "; ".join(filter(None, [self.notes, message]))
        label = plot.load_label(asdict(self))
        print(f"ERROR {self.server} {self.tool} {self.method} {label}: {message}", flush=True)
        return self


@dataclass
class Peer:
    """A started server, the targets it is driven through, and its configuration."""

    server: Server
    targets: list[Target]
    configuration: dict[str, Any] = field(default_factory=dict)
    spare: list[Target] = field(default_factory=list)  # tried before use (perf_analyzer)


@dataclass(frozen=True)
class Workload:
    """The model and the requests: riskwire's raw transactions, the peers' feature rows."""

    models: Path
    model_file: Path
    bodies: loadgen.Bodies  # riskwire / echo (raw transaction fields)
    model_infer_body: Path  # framed single-row ModelInferRequest for h2load
    features: list[list[float]]  # peers: feature rows (finite, cards with history)
    expected: list[float]  # LightGBM's probabilities for them, computed here


def prepare_workload(models: Path, out: Path, rows: int = 64) -> Workload:
    """Bodies for every server; the peers' features come from the offline feature kernel."""
    import lightgbm as lgb
    import numpy as np

    from riskwire.kernels.encoding import encode_columns
    from riskwire.kernels.features import compute_features_offline
    from riskwire.pipeline import synth
    from riskwire.pipeline.data import validate_table

    found = [p for p in (models / "fraud").iterdir() if p.name.isdigit()]
    model_file = max(found, key=lambda p: int(p.name)) / "model.txt"
    raw = validate_table(synth.generate(5000, seed=11))
    features, _ = compute_features_offline(encode_columns(raw.columns))
    finite = features[np.isfinite(features).all(axis=1)][-rows:]  # JSON has no NaN
    expected = lgb.Booster(model_file=str(model_file)).predict(finite)
    bodies = loadgen.prepare_bodies(out, 2, pa_rows=rows)
    infer = out / "riskwire_model_infer.body"
    infer.write_bytes(loadgen.grpc_frame(bodies.messages[loadgen.MODEL_INFER]))
    return Workload(models, model_file, bodies, infer, finite.tolist(), expected.tolist())


def grpc_targets(work: Workload, server: str, where: str) -> list[Target]:
    """riskwire's (or the echo's) ModelInfer: h2load with one body, perf_analyzer cycling 64."""
    path, message = loadgen.MODEL_INFER, work.bodies.messages[loadgen.MODEL_INFER]
    common = {"server": server, "config": "", "protocol": "grpc", "method": "ModelInfer"}
    common |= {
        "grpc_target": where,
        "checker": lambda: loadgen.check_call(where, path, work.bodies),
    }
    h2load = Target(
        **common,
        tool="h2load",
        url=f"http://{where}{path}",
        path=path,
        message=message,
        body=work.model_infer_body,
        headers=loadgen.GRPC_HEADERS,
    )
    return [h2load, Target(**common, tool="perf_analyzer", pa_input=work.bodies.pa_input)]


@dataclass
class Bench:
    """The load tools and settings of a run, and every point measured so far."""

    tools: dict[str, str]
    args: argparse.Namespace
    out: Path
    points: list[Point] = field(default_factory=list)
    repeat: int = 0  # stamped on every point measured
    # server name -> CPU seconds of its processes so far (Server.cpu_seconds)
    cpu: dict[str, Callable[[], float]] = field(default_factory=dict)

    def _cpu_mark(self, server: str) -> tuple[float, float] | None:
        """(CPU seconds of the server's processes, monotonic seconds) now; None unknown."""
        cpu = self.cpu.get(server)
        return None if cpu is None else (cpu(), time.monotonic())

    def _cpu_per_request(self, point: Point, mark: tuple[float, float] | None) -> None:
        """Set the point's server CPU per request from a mark taken before its run."""
        now = self._cpu_mark(point.server)
        if mark is None or now is None or not point.rps or now[1] <= mark[1]:
            return
        cores = (now[0] - mark[0]) / (now[1] - mark[1])
        point.server_cpu_us = round(cores / point.rps * 1e6, 1)

    def measure(self, target: Target, phase: str, concurrency: int | None = None,
                rate: float | None = None, seconds: float | None = None) -> Point:  # fmt: skip
        """Run one point, check the server still answers correctly, keep and print it."""
        point = Point(phase, target.server, target.config, target.tool, target.protocol,
                      target.method, concurrency, rate, repeat=self.repeat)  # fmt: skip
        seconds = seconds or self.args.duration
        if target.tool == "perf_analyzer":
            self._perf_analyzer(target, point, seconds)
        else:
            self._h2load(target, point, seconds)
        problem = target.check()
        if problem:
            point.fail(f"after the run: {problem}")
        if phase != "probe":
            self.points.append(point)
            print(f"  {plot.format_table([asdict(point)]).splitlines()[-1]}", flush=True)
        return point

    def h2load_args(
        self, target: Target, clients: int, seconds: float, log: Path, rate: float | None
    ) -> list[str]:
        """One thread, ``clients`` connections of one stream each, optionally rate-limited."""
        args = [self.tools["h2load"], "-t", "1", "-c", str(clients), "-m", "1"]
        args += ["-D", f"{round(seconds * 1000)}ms", "-d", str(target.body), "--log-file", str(log)]
        if rate:
            args += ["--rps", f"{rate / clients:.4f}"]  # h2load's rate is per connection
        if target.protocol == "http":
            args.append("--h1")  # uvicorn speaks HTTP/1.1 only
        for header in target.headers:
            args += ["-H", header]
        return [*args, target.url]

    def _h2load(self, target: Target, point: Point, duration: float) -> None:
        """A warm-up run, then the measured run; percentiles from the per-request log."""
        clients = point.concurrency or self.args.rate_clients
        log = self.out / f"h2load-{target.server}-{target.protocol}-{clients}.log"
        ok_size = target.ok_size()
        if ok_size is None:
            point.fail("not run: the check call fails")
            return
        mark = None
        for seconds in (self.args.warmup, duration):
            log.unlink(missing_ok=True)  # h2load appends to its log: keep this run's only
            command = self.h2load_args(target, clients, seconds, log, point.rate)
            mark = self._cpu_mark(target.server)  # the last (measured) run's counts
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=seconds * 3 + 60
                )
            except subprocess.TimeoutExpired:
                point.fail(f"h2load did not finish in {seconds * 3 + 60:.0f}s")
                return
        try:
            summary = loadgen.parse_h2load_output(done.stdout)
        except ValueError as exc:
            point.fail(f"{exc}: {done.stderr.strip()[-300:]}")
            return
        latencies, bad = loadgen.parse_h2load_log(log.read_text() if log.exists() else "")
        if not self.args.keep_logs:
            log.unlink(missing_ok=True)
        point.rps, point.errors, point.requests = summary.rps, summary.errors, summary.total
        self._cpu_per_request(point, mark)
        point.p50_ms, point.p99_ms, point.p999_ms = (
            loadgen.percentile(latencies, q) for q in (50, 99, 99.9)
        )
        if summary.errors:
            point.notes = f"{summary.errors} requests without HTTP 2xx ({bad} in the log)"
        if target.protocol == "grpc" and summary.data_bytes < 0.9 * ok_size * summary.total:
            failed = summary.total - summary.data_bytes / ok_size  # gRPC errors carry no DATA
            point.fail(f"~{failed:.0f} of {summary.total} calls got a gRPC error", round(failed))

    def _perf_analyzer(self, target: Target, point: Point, duration: float) -> None:
        """One perf_analyzer run on ModelInfer (stable windows spanning about ``duration``)."""
        stem = self.out / f"perf_analyzer-{target.server}-c{point.concurrency}"
        window_ms = max(300, int(duration * 1000 / 3))
        command = loadgen.perf_analyzer_command(
            self.tools["perf_analyzer"],
            target.grpc_target,
            "fraud",
            point.concurrency or 1,
            target.pa_input,
            window_ms,
            stem.with_suffix(".csv"),
            stability_pct=100 if self.args.smoke else 25,  # smoke: plumbing, not stability
        )
        env, timeout = loadgen.perf_analyzer_env(), window_ms * 8 / 1000 + 60
        mark = self._cpu_mark(target.server)  # every window runs at the same load
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
            output = done.stdout + done.stderr
            stem.with_suffix(".txt").write_text(output)
            csv_text = stem.with_suffix(".csv").read_text() if done.returncode == 0 else ""
            rows = loadgen.parse_perf_analyzer_csv(csv_text) if csv_text else []
        except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
            output, rows = str(exc), []
        if not rows:
            point.fail("perf_analyzer failed: " + " | ".join(output.strip().splitlines()[-2:]))
            return
        point.rps, point.p50_ms, point.p99_ms = rows[0].rps, rows[0].p50_ms, rows[0].p99_ms
        point.notes = "p99.9 not reported by perf_analyzer"
        self._cpu_per_request(point, mark)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks durations, levels and MLServer tuning."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--models", type=Path, help="models dir with a 'fraud' package (default: demo, cached)")
    add("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes per server")
    add("--duration", type=float, default=8.0, help="seconds per point")
    add("--warmup", type=float, default=None, help="warm-up seconds per point")
    add("--concurrency", default="1,8,32,128", help="comma-separated list")
    add("--rate", default="auto", help="fixed rate in req/s; auto: half the slowest at c=8")
    add("--rate-clients", type=int, default=8, help="connections at the fixed rate")
    add("--repeat", type=int, default=1, help="sweeps over all servers; ratios: medians")
    add("--ratio-concurrency", type=int, default=8, help="the concurrency of the headline")
    add("--mlserver-configs", help="WORKERS[:BATCH_SIZE:BATCH_SECONDS],... e.g. 0,2,2:32:0.002")
    add("--tune-concurrency", default="8,32", help="MLServer tuning levels (first one ranks)")
    add("--tune-duration", type=float, default=None, help="seconds per tuning point")
    add("--fastapi-omp-threads", type=int, default=1, help="OMP_NUM_THREADS; 0: LightGBM's")
    for peer in ("mlserver", "fastapi"):
        add(f"--skip-{peer}", action="store_true", help=f"leave {peer} out")
        add(f"--with-{peer}", action="store_true", help=f"smoke: install {peer} when absent")
    add("--smoke", action="store_true", help="1.5 s points at concurrency 1,8; absent peers skip")
    add("--profile", default="dev", help="riskwire serve --profile (dev: the defaults)")
    add("--json", action="store_true", help="print the JSON summary as the last line")
    add("--out", type=Path, help="results directory")
    add("--keep-logs", action="store_true", help="keep h2load's per-request logs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.concurrency = min(args.duration, 1.5), "1,8"
    if args.warmup is None:
        args.warmup = 0.5 if args.smoke else min(2.0, args.duration / 4)
    if args.tune_duration is None:
        args.tune_duration = max(1.0, args.duration / 2)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.tune_levels = [int(c) for c in args.tune_concurrency.split(",") if c.strip()]
    if args.mlserver_configs:
        args.ml_configs = mlserver_peer.parse_configs(args.mlserver_configs)
    elif args.smoke:
        args.ml_configs = [MLServerConfig(args.workers, omp_threads=1)]
    else:
        args.ml_configs = mlserver_peer.default_configs(args.workers)
    return args


def start_mlserver(work: Workload, config: MLServerConfig, root: Path, out: Path) -> Peer | str:
    """MLServer with ``config``: a Peer (perf_analyzer's target kept spare) or the problem."""
    started = mlserver_peer.start(config, work.model_file, work.features, work.expected, root, out)
    if isinstance(started, str):
        return started
    server, targets, configuration = started
    return Peer(server, targets[:2], configuration, targets[2:])


def tune_mlserver(bench: Bench, work: Workload) -> tuple[MLServerConfig | None, list[str]]:
    """Each configuration alone; the best gRPC req/s at the first tuning level wins."""
    configs, levels = bench.args.ml_configs, bench.args.tune_levels
    if len(configs) == 1:
        return configs[0], []
    print(f"\nMLServer configurations, one at a time, gRPC ModelInfer at c={levels}:", flush=True)
    scores: dict[MLServerConfig, float] = {}
    problems = []
    for i, config in enumerate(configs):
        peer = start_mlserver(work, config, bench.out / f"mlserver-tune-{i}", bench.out)
        if isinstance(peer, str):
            problems.append(f"mlserver {config.label}: {peer}")
            continue
        try:
            for c in levels:
                point = bench.measure(peer.targets[0], "tune", c, seconds=bench.args.tune_duration)
                if c == levels[0] and plot.valid(asdict(point)):
                    scores[config] = point.rps or 0.0
        finally:
            peer.server.stop()
    return (max(scores, key=scores.__getitem__) if scores else None), problems


def start_servers(
    work: Workload, args: argparse.Namespace, out: Path, state: Path, peers: dict[str, Peer]
) -> None:
    """Start riskwire, echo and FastAPI into ``peers`` (the caller stops them) and wait."""
    from riskwire.server.config import Settings

    threads, n = Settings().threads_per_worker, args.workers
    ports = {name: loadgen.free_port() for name in ("riskwire", "echo", "fastapi")}
    env = {**os.environ, "RISKWIRE_THREADS_PER_WORKER": str(threads),
           "RISKWIRE_STATE_SNAPSHOT": str(state / "cards.snapshot"),
           "RISKWIRE_SHADOW_DIR": str(state / "shadow"),  # prediction log: fresh per run
           "RISKWIRE_ADMIN_PORT": "0", "RISKWIRE_METRICS_PORT": "0"}  # fmt: skip
    cli = [sys.executable, "-m", "riskwire.clients.cli", "serve", "--models", str(work.models)]
    commands = {
        "riskwire": [*cli, *f"--port {ports['riskwire']} --workers {n}".split(),
                     "--profile", args.profile],
        "echo": [sys.executable, str(REPO / "perf" / "echo_server.py"),
                 *f"--port {ports['echo']} --workers {n} --threads {threads}".split()],
    }  # fmt: skip
    for name, command in commands.items():
        where = f"127.0.0.1:{ports[name]}"
        server = Server(name, command, where, out / f"{name}.log", env)
        config = {"command": command, "threads_per_worker": threads, "workers": n}
        peers[name] = Peer(server, grpc_targets(work, name, where), config)
        server.start()
    if "fastapi" not in args.skip:
        base, command = (
            f"http://127.0.0.1:{ports['fastapi']}",
            fastapi_peer.command(ports["fastapi"], n),
        )
        env = fastapi_peer.environment(work.model_file, args.fastapi_omp_threads)
        server = Server("fastapi", command, base, out / "fastapi.log", env)
        target = fastapi_peer.target(base, work.features, work.expected, out)
        config = fastapi_peer.configuration(n, args.fastapi_omp_threads)
        peers["fastapi"] = Peer(server, [target], {"command": command, **config})
        server.start()
    for name, peer in peers.items():
        where = peer.server.target
        if name == "fastapi":
            probe = lambda b=where: fastapi_peer.ready(b)  # noqa: E731
            peer.server.wait_until(fastapi_peer.READY_PATTERN, n, probe, 120)
        else:
            pattern = rf"serving on \S+:{where.rsplit(':', 1)[1]} with {n} workers"
            peer.server.wait_until(pattern, 1, lambda w=where: loadgen.health_ok(w), 180)


def auto_rate(points: list[Point], concurrency: int) -> float | None:
    """Half the slowest h2load throughput at ``concurrency``, to 2 significant digits."""
    found = [
        p.rps
        for p in points
        if p.phase == "main"
        and p.tool == "h2load"
        and p.rps
        and p.concurrency == concurrency
        and not p.errors
    ]
    if not found:
        return None
    half = min(found) / 2
    return float(max(10, round(half, -max(0, len(str(int(half))) - 2))))


def fixed_rate(args: argparse.Namespace, points: list[Point]) -> float | None:
    """The ``--rate`` to drive every server at: a number, ``auto`` or ``off`` (None)."""
    if args.rate == "off":
        return None
    if args.rate == "auto":
        return auto_rate(points, args.ratio_concurrency)
    return float(args.rate)


def setup_peers(args: argparse.Namespace, lgb_version: str, skipped: list[str]) -> None:
    """Decide which peers run (``args.skip``); install their venvs where allowed."""
    args.skip = set()
    for name, module in (("mlserver", mlserver_peer), ("fastapi", fastapi_peer)):
        if getattr(args, f"skip_{name}"):
            args.skip.add(name)
            skipped.append(f"{name}: skipped (--skip-{name})")
        elif args.smoke and not getattr(args, f"with_{name}") and not module.installed(lgb_version):
            args.skip.add(name)
            skipped.append(f"{name}: skipped, no venv at {module.VENV} (--with-{name} installs it)")
        else:
            problem = module.ensure_venv(lgb_version)
            if problem:
                args.skip.add(name)
                skipped.append(f"{name}: install failed: {problem}")
    for line in skipped:
        print(f"SKIP {line}", flush=True)


def collect_versions(tools: dict[str, str], skip: set[str]) -> dict[str, Any]:
    """Library versions here and in the peer venvs, and the load tools' versions."""
    from importlib import metadata

    here: dict[str, str | None] = {}
    for name in (
        "riskwire",
        "grpcio",
        "protobuf",
        "numpy",
        "numba",
        "lightgbm",
        "tritonclient",
        "matplotlib",
    ):
        try:
            here[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            here[name] = None
    found: dict[str, Any] = {"riskwire_venv": here}
    for name, tool in tools.items():
        env = loadgen.perf_analyzer_env() if name == "perf_analyzer" else None
        done = subprocess.run([tool, "--version"], capture_output=True, text=True, env=env)
        found[name] = ((done.stdout + done.stderr).strip().splitlines() or ["?"])[-1]
    if "mlserver" not in skip:
        found["mlserver_venv"] = mlserver_peer.versions()
    if "fastapi" not in skip:
        found["fastapi_venv"] = fastapi_peer.versions()
    return found


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Tune MLServer, start every server, measure every point, tear down, summarise."""
    from importlib import metadata

    from perf.bench_serving import ensure_models

    skipped: list[str] = []
    tools = {}
    for name in ("h2load", "perf_analyzer"):
        problem = loadgen.tool_problem(name)
        skipped += [problem] if problem else []
        tools |= {} if problem else {name: loadgen.find_tool(name) or name}
    if "h2load" not in tools:
        raise SystemExit(f"run: {skipped[0]}")
    setup_peers(args, metadata.version("lightgbm"), skipped)
    work = prepare_workload(ensure_models(args.models), out)
    bench = Bench(tools, args, out)
    best, problems = (None, []) if "mlserver" in args.skip else tune_mlserver(bench, work)
    skipped += problems
    if "mlserver" not in args.skip and best is None:
        skipped.append("mlserver: no configuration worked")
    state = tempfile.TemporaryDirectory(prefix="riskwire-run-state-")
    started: dict[str, Peer] = {}
    idle: dict[str, float] = {}
    try:
        start_servers(work, args, out, Path(state.name), started)
        if best is not None:
            peer = start_mlserver(work, best, out / "mlserver", out)
            if isinstance(peer, str):
                skipped.append(f"mlserver ({best.label}) failed to start: {peer}")
            else:
                started["mlserver"] = peer
        for target in (t for peer in started.values() for t in peer.targets):
            problem = target.check()
            if problem:
                raise SystemExit(f"run: {target.server} {target.method}: {problem}")
        peers = {name: started[name] for name in SERVER_ORDER if name in started}
        for peer in peers.values():
            for spare in peer.spare if "perf_analyzer" in tools else ():
                probe = bench.measure(spare, "probe", 1)
                if probe.errors:
                    skipped.append(f"perf_analyzer cannot drive {spare.server}: {probe.notes}")
                else:
                    peer.targets.append(spare)
        idle = {name: idle_cpu(peer.server) for name, peer in peers.items()}
        bench.cpu = {name: peer.server.cpu_seconds for name, peer in peers.items()}
        names, rate = list(peers), None
        for repeat in range(args.repeat):
            bench.repeat = repeat
            print(f"\nrepeat {repeat + 1} of {args.repeat}:" if args.repeat > 1 else "")
            for i, level in enumerate(args.levels):
                k = (i + repeat) % len(names)  # rotate who goes first
                for name in names[k:] + names[:k]:
                    for target in (t for t in peers[name].targets if t.tool in tools):
                        bench.measure(target, "main", level)
            rate = rate or fixed_rate(args, bench.points)
            if rate:
                print(f"fixed rate {rate:g} req/s over {args.rate_clients} connections:")
                for target in (t for p in peers.values() for t in p.targets if t.tool == "h2load"):
                    bench.measure(target, "main", None, rate)
    finally:
        for peer in started.values():
            peer.server.stop()
        state.cleanup()
    context = {
        "skipped": skipped,
        "idle_cpu_pct": idle,
        "versions": collect_versions(tools, args.skip),
        "mlserver_best_config": best.label if best else None,
        "configuration": {name: peer.configuration for name, peer in started.items()},
        "targets": [t.describe() for p in started.values() for t in p.targets],
    }
    return summarise(args, bench.points, context, out)


def summarise(
    args: argparse.Namespace, points: list[Point], context: dict[str, Any], out: Path
) -> dict[str, Any]:
    """The summary of the run: printed, and written as results.json/.csv and plot.png."""
    machine = loadgen.machine_info(args.workers, 0)
    machine.pop("threads_per_worker", None)
    keys = ("duration", "warmup", "levels", "rate", "rate_clients", "repeat", "smoke", "profile")
    context = {**context, "machine": machine, "settings": {k: getattr(args, k) for k in keys}}
    title = f"{machine['cpu_model']}, {args.workers} workers per server"
    return plot.report([asdict(p) for p in points], context, args.ratio_concurrency, out, title)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 1 when riskwire had errors, else 0 (peer errors are reported only)."""
    args = parse_args(argv)
    out = args.out or REPO / "perf" / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    summary = run(args, out)
    print(f"\nresults in {out} (plot: {summary['plot']})", flush=True)
    if args.json:
        print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
