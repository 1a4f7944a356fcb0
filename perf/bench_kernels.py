"""Forest kernel benchmark: riskwire's Numba forest vs LightGBM and tl2cgen, side by side.

Prints, in one run on one machine, for the same model and the same rows:

* correctness: max |raw score - LightGBM raw score| for our kernel and for tl2cgen;
* single-row latency (median and p99 over many calls on distinct rows);
* single-threaded batch throughput (rows/s) at several batch sizes;
* the ratios (ours / theirs, higher is better).

Without ``--model`` it trains a synthetic fraud-like model (fixed seed) and says so.
``--smoke`` uses a tiny model and few repetitions so CI can run it in seconds.
``--json`` makes the last printed line one JSON object with all numbers.

Sections are plain functions in ``SECTIONS``; each takes the shared :class:`BenchContext`
and returns a dict that is merged into the JSON result. Add a section (for example a
feature-kernel throughput section) by writing one and appending it to the list.

    python perf/bench_kernels.py [--model model.txt] [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from riskwire.kernels.forest import Forest

SEED = 20240601
# (name, number of codes) of the synthetic categorical columns, as in kernels/schema.py
SYNTH_CATEGORICALS = (("channel", 5), ("currency", 43), ("country", 249), ("mcc", 10_000))
SYNTH_NUMERIC = 28


@dataclass(frozen=True)
class BenchConfig:
    """How big and how long a run is."""

    train_rows: int
    num_trees: int
    num_leaves: int
    pool_rows: int  # distinct rows the timings cycle through
    latency_calls: int
    batch_sizes: tuple[int, ...]
    min_batch_seconds: float  # keep calling an engine at least this long per batch size
    repeats: int  # best-of repeats for throughput


FULL = BenchConfig(50_000, 300, 63, 65_536, 4_000, (1, 64, 1024, 65_536), 1.0, 3)
SMOKE = BenchConfig(3_000, 20, 15, 4_096, 300, (1, 64, 1024, 4_096), 0.05, 1)


@dataclass
class BenchContext:
    """Everything the sections share: the model, the engines and the benchmark rows."""

    config: BenchConfig
    model_path: Path
    forest: Forest
    booster: lgb.Booster
    tl2cgen_predictor: Any  # tl2cgen.Predictor, or None when tl2cgen is unavailable
    rows: np.ndarray  # (pool_rows, num_feature) float64, with NaN/inf/unseen categories
    log: Callable[[str], None]

    def engines(self) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """Batch predict functions (probabilities, single thread) by engine name."""
        engines: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            "ours": lambda X: self.forest.predict(X, num_threads=1),
            "lightgbm": lambda X: self.booster.predict(X, num_threads=1),
        }
        if self.tl2cgen_predictor is not None:
            engines["tl2cgen"] = lambda X: _tl2cgen_predict(self.tl2cgen_predictor, X)
        return engines


# ---------------------------------------------------------------------------- setup
def synthetic_data(n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Fraud-like rows: numeric columns with NaNs and zeros, then categorical codes."""
    rng = np.random.default_rng(seed)
    numeric = rng.normal(size=(n_rows, SYNTH_NUMERIC))
    numeric[:, 0] = rng.lognormal(3.5, 1.2, n_rows)  # amount
    numeric[:, 1] = rng.uniform(0, 24, n_rows)  # hour
    numeric[:, 2:5] = rng.poisson(0.7, (n_rows, 3))  # counts, many zeros
    numeric[rng.random(numeric.shape) < 0.04] = np.nan
    cats = np.column_stack(
        [
            rng.zipf(1.6, n_rows) % size - (rng.random(n_rows) < 0.01)
            for _, size in SYNTH_CATEGORICALS
        ]
    ).astype(np.float64)  # a few -1 = unknown
    X = np.column_stack([numeric, cats])
    risky = [
        np.isin(cats[:, j], rng.choice(size, max(1, size // 8), replace=False))
        for j, (_, size) in enumerate(SYNTH_CATEGORICALS)
    ]
    x = np.nan_to_num(numeric)
    logit = (
        -4.0
        + 0.6 * np.log1p(x[:, 0]) * (x[:, 1] < 6)
        + 0.5 * x[:, 2]
        + np.sin(x[:, 5] * 2)
        + 0.4 * x[:, 6] * x[:, 7]
        + 0.3 * x[:, 8:16].sum(axis=1)
        + sum(0.8 * r for r in risky)
    )
    y = (rng.random(n_rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)
    return X, y, list(range(SYNTH_NUMERIC, X.shape[1]))


def train_synthetic_model(config: BenchConfig, path: Path) -> None:
    """Train the benchmark model (deterministic) and save it as ``model.txt``."""
    X, y, categorical = synthetic_data(config.train_rows, SEED)
    params = {
        "objective": "binary",
        "num_leaves": config.num_leaves,
        "learning_rate": 0.05,
        "min_data_in_leaf": 20,
        "seed": SEED,
        "deterministic": True,
        "num_threads": 1,  # OpenMP threads crawl when the cores are shared
        "verbose": -1,
    }
    data = lgb.Dataset(X, y, categorical_feature=categorical, params={"verbose": -1})
    booster = lgb.train(params, data, num_boost_round=config.num_trees)
    booster.save_model(str(path))


def benchmark_rows(forest: Forest, n_rows: int) -> np.ndarray:
    """Rows to score: fresh synthetic data with NaN, ±inf, exact zeros, unseen codes."""
    rng = np.random.default_rng(SEED + 1)
    nf = forest.num_feature()
    if nf == SYNTH_NUMERIC + len(SYNTH_CATEGORICALS):
        X = synthetic_data(n_rows, SEED + 1)[0]
        X[:, SYNTH_NUMERIC:][rng.random((n_rows, len(SYNTH_CATEGORICALS))) < 0.01] = 123_456
    else:  # a user model: standard normal, scaled a bit past the usual range
        X = rng.normal(scale=2.0, size=(n_rows, nf))
    special = rng.random(X.shape)
    X[special < 0.005] = np.inf
    X[(special >= 0.005) & (special < 0.01)] = -np.inf
    X[(special >= 0.01) & (special < 0.02)] = 0.0
    return np.ascontiguousarray(X)


def build_tl2cgen(model_path: Path, workdir: Path, smoke: bool, log: Callable[[str], None]) -> Any:
    """Compile the model with tl2cgen (gcc) into ``workdir``; None if unavailable."""
    try:
        import tl2cgen
        import treelite
    except ImportError as exc:
        log(f"tl2cgen: not installed ({exc}); skipped")
        return None
    model = treelite.frontend.load_lightgbm_model(str(model_path))
    libpath = workdir / "forest.so"
    started = time.perf_counter()
    cores = os.cpu_count() or 1
    tl2cgen.export_lib(
        model,
        toolchain="gcc",
        libpath=str(libpath),
        params={"parallel_comp": 1 if smoke else 4 * cores},
        nthread=cores,
    )
    predictor = tl2cgen.Predictor(str(libpath), nthread=1)
    log(
        f"tl2cgen: compiled with gcc in {time.perf_counter() - started:.1f} s "
        f"(thresholds {predictor.threshold_type}, leaf outputs {predictor.leaf_output_type}; "
        "its timings include building the DMatrix from numpy)"
    )
    return predictor


def _tl2cgen_predict(predictor: Any, X: np.ndarray, pred_margin: bool = False) -> np.ndarray:
    import tl2cgen

    out = predictor.predict(tl2cgen.DMatrix(X), pred_margin=pred_margin)
    return np.asarray(out, dtype=np.float64).reshape(X.shape[0])


# ---------------------------------------------------------------------------- sections
def section_correctness(ctx: BenchContext) -> dict[str, Any]:
    """Raw scores of every engine against LightGBM's, on all benchmark rows."""
    expected = ctx.booster.predict(ctx.rows, raw_score=True, num_threads=1)
    ours = ctx.forest.predict(ctx.rows, raw_score=True, num_threads=1)
    result: dict[str, Any] = {"max_abs_diff_vs_lightgbm": float(np.max(np.abs(ours - expected)))}
    ctx.log(f"correctness: ours    max |raw - lightgbm| = {result['max_abs_diff_vs_lightgbm']:.3g}")
    if ctx.tl2cgen_predictor is not None:
        theirs = _tl2cgen_predict(ctx.tl2cgen_predictor, ctx.rows, pred_margin=True)
        diff = np.abs(theirs - expected)
        result["tl2cgen_max_abs_diff_vs_lightgbm"] = float(np.max(diff))
        result["tl2cgen_rows_differing"] = int(np.count_nonzero(diff > 1e-9))
        ctx.log(
            f"correctness: tl2cgen max |raw - lightgbm| = {np.max(diff):.3g}"
            f" ({result['tl2cgen_rows_differing']} of {len(diff)} rows differ by > 1e-9)"
        )
    return result


def section_single_row(ctx: BenchContext) -> dict[str, Any]:
    """Latency of scoring one row per call, cycling through distinct rows."""
    rows = [np.ascontiguousarray(r) for r in ctx.rows[: ctx.config.latency_calls]]
    calls: dict[str, Callable[[np.ndarray], Any]] = {
        "ours": ctx.forest.predict_row,
        "lightgbm": lambda x: ctx.booster.predict(x.reshape(1, -1), num_threads=1),
    }
    if ctx.tl2cgen_predictor is not None:
        calls["tl2cgen"] = lambda x: _tl2cgen_predict(ctx.tl2cgen_predictor, x.reshape(1, -1))
    result: dict[str, Any] = {}
    for name, call in calls.items():
        for x in rows[:50]:  # warm up
            call(x)
        times = np.empty(len(rows), dtype=np.int64)
        for i, x in enumerate(rows):
            start = time.perf_counter_ns()
            call(x)
            times[i] = time.perf_counter_ns() - start
        median, p99 = np.median(times) / 1e3, np.percentile(times, 99) / 1e3
        result[f"single_row_us_median_{name}"] = float(median)
        result[f"single_row_us_p99_{name}"] = float(p99)
        ctx.log(f"single row: {name:9s} median {median:8.2f} us   p99 {p99:8.2f} us")
    ours = result["single_row_us_median_ours"]
    result["single_row_speedup_vs_lightgbm"] = result["single_row_us_median_lightgbm"] / ours
    if "single_row_us_median_tl2cgen" in result:
        result["single_row_speedup_vs_tl2cgen"] = result["single_row_us_median_tl2cgen"] / ours
    ctx.log(f"single row: ours is {result['single_row_speedup_vs_lightgbm']:.1f}x LightGBM")
    return result


def section_batch(ctx: BenchContext) -> dict[str, Any]:
    """Single-threaded throughput (rows/s) per batch size, on distinct batches."""
    result: dict[str, Any] = {}
    engines = ctx.engines()
    for size in ctx.config.batch_sizes:
        size = min(size, len(ctx.rows))
        batches = [ctx.rows[i : i + size] for i in range(0, len(ctx.rows) - size + 1, size)]
        for name, predict in engines.items():
            rate = _throughput(predict, batches, ctx.config)
            result[f"batch_rows_per_s_{name}_{size}"] = rate
        line = "   ".join(f"{n} {result[f'batch_rows_per_s_{n}_{size}']:>11,.0f}" for n in engines)
        ctx.log(f"batch {size:>6}: rows/s  {line}")
    by_size = {}
    for size in ctx.config.batch_sizes:
        size = min(size, len(ctx.rows))
        ours = result[f"batch_rows_per_s_ours_{size}"]
        for other in ("lightgbm", "tl2cgen"):
            key = f"batch_rows_per_s_{other}_{size}"
            if key in result:
                by_size.setdefault(other, {})[str(size)] = ours / result[key]
    result["batch_ratio_vs_lightgbm_by_size"] = by_size.get("lightgbm", {})
    result["batch_ratio_vs_tl2cgen_by_size"] = by_size.get("tl2cgen", {})
    largest = str(min(max(ctx.config.batch_sizes), len(ctx.rows)))
    result["batch_ratio_vs_lightgbm"] = result["batch_ratio_vs_lightgbm_by_size"][largest]
    if result["batch_ratio_vs_tl2cgen_by_size"]:
        result["batch_ratio_vs_tl2cgen"] = result["batch_ratio_vs_tl2cgen_by_size"][largest]
    for other, ratios in by_size.items():
        text = ", ".join(f"{s}: {r:.2f}x" for s, r in ratios.items())
        ctx.log(f"batch: ours / {other} by batch size: {text}")
    return result


def _throughput(
    predict: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray], config: BenchConfig
) -> float:
    """Best-of-``repeats`` rows/s, each repeat running at least ``min_batch_seconds``."""
    predict(batches[0])  # warm up
    best = 0.0
    for _ in range(config.repeats):
        rows, i, elapsed = 0, 0, 0.0
        start = time.perf_counter()
        while elapsed < config.min_batch_seconds:
            batch = batches[i % len(batches)]
            predict(batch)
            rows += batch.shape[0]
            i += 1
            elapsed = time.perf_counter() - start
        best = max(best, rows / elapsed)
    return best


def section_features(ctx: BenchContext) -> dict[str, Any]:
    """Stateful feature kernel: transactions/s offline (one pass) and online (one row)."""
    from riskwire.kernels.encoding import encode_columns
    from riskwire.kernels.features import compute_features, compute_features_offline
    from riskwire.kernels.schema import NUM_FEATURES
    from riskwire.kernels.state import CardStateTable
    from riskwire.pipeline import synth

    rows = 20_000 if ctx.config is SMOKE else 400_000
    table = synth.generate(rows, seed=11).to_pydict()
    table["event_time"] = [int(t.timestamp() * 1000) for t in table["event_time"]]
    tx = encode_columns(table)
    compute_features_offline(tx.take(slice(0, 1000)))  # compile / load from cache
    out = np.empty((rows, NUM_FEATURES))
    start = time.perf_counter()
    compute_features_offline(tx, out=out)
    offline = rows / (time.perf_counter() - start)
    state = CardStateTable.create(1 << 16)
    single = [tx.take(slice(i, i + 1)) for i in range(min(rows, 20_000))]
    row_out = np.empty((1, NUM_FEATURES))
    start = time.perf_counter()
    for one in single:
        compute_features(state, one, row_out)
    online = len(single) / (time.perf_counter() - start)
    ctx.log(
        f"features: offline {offline:,.0f} transactions/s (one pass over {rows:,} rows), "
        f"online {online:,.0f} transactions/s (one row per call, state shared)"
    )
    return {"feature_tx_per_s_offline": offline, "feature_tx_per_s_online": online}


SECTIONS: list[Callable[[BenchContext], dict[str, Any]]] = [
    section_correctness,
    section_single_row,
    section_batch,
    section_features,
]


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="LightGBM model.txt (default: synthetic)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few repetitions")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Set up the model and engines, run every section, return the merged numbers."""
    config = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="riskwire-bench-") as tmp:
        workdir = Path(tmp)
        if args.model is None:
            model_path = workdir / "model.txt"
            started = time.perf_counter()
            train_synthetic_model(config, model_path)
            log(
                f"model: synthetic ({config.num_trees} trees, {config.num_leaves} leaves, "
                f"{config.train_rows} rows, seed {SEED}), trained in "
                f"{time.perf_counter() - started:.1f} s (pass --model to use yours)"
            )
        else:
            model_path = args.model
            log(f"model: {model_path}")
        forest = Forest.from_model_file(model_path)
        forest.warmup()
        booster = lgb.Booster(model_file=str(model_path))
        ctx = BenchContext(
            config=config,
            model_path=model_path,
            forest=forest,
            booster=booster,
            tl2cgen_predictor=build_tl2cgen(model_path, workdir, args.smoke, log),
            rows=benchmark_rows(forest, config.pool_rows),
            log=log,
        )
        log(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"python {platform.python_version()}, lightgbm {lgb.__version__}; "
            f"{forest.num_trees()} trees, {forest.num_feature()} features; single-threaded"
        )
        result: dict[str, Any] = {
            "model": "synthetic" if args.model is None else str(args.model),
            "smoke": bool(args.smoke),
            "num_trees": forest.num_trees(),
            "num_feature": forest.num_feature(),
        }
        for section in SECTIONS:
            result.update(section(ctx))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a report (and a final JSON line with ``--json``)."""
    args = parse_args(argv)
    result = run(args, log=lambda line: print(line, flush=True))
    if args.json:
        print(json.dumps(result, sort_keys=True, allow_nan=False))
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
