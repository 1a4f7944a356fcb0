"""Results of ``perf/run.py``: ratios, the summary, the text table, the CSV and the PNG plot.

Everything here works on measured points as plain dicts (the rows of ``results.json``),
so it is unit-tested on hand-made points and needs nothing but matplotlib for the PNG
(optional: without it the plot is skipped with a message saying how to get it).

A point has ``server, config, tool, protocol, method, concurrency, rate, rps, p50_ms,
p99_ms, p999_ms, errors, phase``; ``concurrency`` is set for closed-loop points,
``rate`` (requests/s offered) for the fixed-rate point; ``repeat`` numbers the repeats.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Point = Mapping[str, Any]
SERVERS = ("riskwire", "mlserver", "fastapi", "echo")
Series = tuple[str, str, str, str]  # server, tool, protocol, method

OURS_GRPC: Series = ("riskwire", "h2load", "grpc", "ModelInfer")
OURS_PA: Series = ("riskwire", "perf_analyzer", "grpc", "ModelInfer")
# comparison name → (ours, theirs): same tool on both sides; protocols differ for HTTP peers.
COMPARISONS: dict[str, tuple[Series, Series]] = {
    "mlserver": (OURS_GRPC, ("mlserver", "h2load", "grpc", "ModelInfer")),
    "mlserver_perf_analyzer": (OURS_PA, ("mlserver", "perf_analyzer", "grpc", "ModelInfer")),
    "mlserver_rest": (OURS_GRPC, ("mlserver", "h2load", "http", "REST infer")),
    "fastapi": (OURS_GRPC, ("fastapi", "h2load", "http", "POST /predict")),
    "echo": (OURS_GRPC, ("echo", "h2load", "grpc", "ModelInfer")),
    "echo_perf_analyzer": (OURS_PA, ("echo", "perf_analyzer", "grpc", "ModelInfer")),
}
NOTES = (
    "MLServer and FastAPI get the 23 precomputed features and only run LightGBM predict; "
    "riskwire gets the raw transaction (10 tensors) and validates it, computes features with "
    "per-card state, predicts and decides: riskwire does more work per request.",
    "riskwire/fastapi and riskwire/mlserver_rest compare riskwire's gRPC with the peer's "
    "HTTP/1.1 JSON (riskwire has no HTTP endpoint): same tool (h2load), other protocol.",
    "All servers run at once with the same worker count, one driven at a time; the load "
    "generator shares the machine's cores with the server under test.",
)


CSV_FIELDS = (
    "phase", "server", "config", "tool", "protocol", "method", "concurrency", "rate", "repeat",
    "rps", "p50_ms", "p99_ms", "p999_ms", "errors", "requests", "server_cpu_us", "notes",
)  # fmt: skip


def series(point: Point) -> Series:
    """The (server, tool, protocol, method) a point belongs to."""
    return point["server"], point["tool"], point["protocol"], point["method"]


def load_label(point: Point) -> str:
    """``c=8`` for a concurrency point, ``rate=500`` for the fixed-rate point."""
    if point.get("rate"):
        return f"rate={point['rate']:g}"
    return f"c={point['concurrency']}"


def valid(point: Point) -> bool:
    """A point that counts: measured, positive throughput, no errors."""
    rps = point.get("rps")
    return not point.get("errors") and isinstance(rps, int | float) and rps > 0


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs <= 0 or not math.isfinite(ours / theirs):
        return None
    return ours / theirs


def ratios(points: Iterable[Point]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per comparison and load: ``throughput`` and ``p99`` ratios, ours/theirs.

    Points pair up within a repeat (same ``repeat`` number); with repeats, each ratio is
    the median of the paired ratios. Only main-phase points without errors count; a load
    missing on either side is left out. Throughput > 1 and p99 < 1 favour riskwire.
    """
    index = {
        (series(p), load_label(p), p.get("repeat", 0)): p
        for p in points
        if p.get("phase", "main") == "main"
    }
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, (ours_key, theirs_key) in COMPARISONS.items():
        for (key, load, repeat), ours in index.items():
            theirs = index.get((theirs_key, load, repeat))
            if key != ours_key or theirs is None or not (valid(ours) and valid(theirs)):
                continue
            cell = cells.setdefault(name, {}).setdefault(load, {"throughput": [], "p99": []})
            found = {"throughput": _ratio(ours["rps"], theirs["rps"]),
                     "p99": _ratio(ours.get("p99_ms"), theirs.get("p99_ms"))}  # fmt: skip
            for field, value in found.items():
                cell[field] += [] if value is None else [value]
    return {
        name: {load: {f: _median(v) for f, v in cell.items()} for load, cell in loads.items()}
        for name, loads in cells.items()
    }


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def headline(
    table: Mapping[str, Mapping[str, Mapping[str, float | None]]], concurrency: int = 8
) -> dict[str, float | None]:
    """The summary keys at one concurrency (None where not measured).

    Against MLServer the perf_analyzer comparison is used when it exists (the issue's
    tool for the Open Inference Protocol), else h2load on the same ModelInfer.
    """
    load = f"c={concurrency}"

    def cell(name: str, field: str) -> float | None:
        return table.get(name, {}).get(load, {}).get(field)

    ml = "mlserver_perf_analyzer" if cell("mlserver_perf_analyzer", "throughput") else "mlserver"
    out: dict[str, Any] = {"ratio_concurrency": concurrency, "ratio_vs_mlserver_comparison": ml}
    for key, name in (("mlserver", ml), ("fastapi", "fastapi"), ("echo", "echo")):
        out[f"throughput_ratio_vs_{key}"] = cell(name, "throughput")
        out[f"p99_ratio_vs_{key}"] = cell(name, "p99")
    out["throughput_ratio_vs_mlserver_rest"] = cell("mlserver_rest", "throughput")
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def format_table(points: Sequence[Point]) -> str:
    """The human-readable table of every point."""
    head = (
        f"{'server':<9} {'config':<29} {'tool':<13} {'proto':<5} {'method':<13} {'load':>9} "
        f"{'rep':>3} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'errors':>6} "
        f"{'cpu us/req':>10}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(
            f"{p['server']:<9} {(p.get('config') or '-')[:29]:<29} {p['tool']:<13} "
            f"{p['protocol']:<5} {p['method']:<13} {load_label(p):>9} {p.get('repeat', 0):>3} "
            f"{_fmt(p.get('rps'), 0):>9} "
            f"{_fmt(p.get('p50_ms')):>8} {_fmt(p.get('p99_ms')):>8} "
            f"{_fmt(p.get('p999_ms')):>9} {p.get('errors', 0):>6} "
            f"{_fmt(p.get('server_cpu_us'), 1):>10}"
        )
    return "\n".join(lines)


def format_ratios(table: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> str:
    """One line per comparison: throughput and p99 ratios at every load."""
    lines = []
    for name, (ours, theirs) in COMPARISONS.items():
        cells = table.get(name)
        if not cells:
            continue
        lines.append(f"riskwire/{name}  ({' '.join(ours[1:])}  vs  {' '.join(theirs[1:])})")
        for load, value in cells.items():
            lines.append(
                f"    {load:>10}  throughput x{_fmt(value['throughput'], 3)}"
                f"   p99 x{_fmt(value['p99'], 3)}"
            )
    return "\n".join(lines) if lines else "(no comparison had both sides measured)"


def write_csv(points: Iterable[Point], path: Path) -> None:
    """Every point as a CSV row (missing values empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for p in points:
            writer.writerow({k: ("" if p.get(k) is None else p.get(k)) for k in CSV_FIELDS})


def render_png(points: Sequence[Point], path: Path, title: str) -> str | None:
    """Throughput vs p99 per series (one marker per concurrency); None, or why not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): plot skipped"
    groups: dict[Series, dict[int, list[Point]]] = {}
    for p in points:
        if p.get("phase", "main") == "main" and not p.get("rate") and valid(p) and p.get("p99_ms"):
            groups.setdefault(series(p), {}).setdefault(p["concurrency"], []).append(p)
    if not groups:
        return "no valid points to plot"
    from matplotlib.ticker import ScalarFormatter

    colors = dict(zip(SERVERS, ("tab:red", "tab:blue", "tab:green", "tab:gray"), strict=True))
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for key, by_level in sorted(groups.items()):
        levels = sorted(by_level)  # medians over repeats
        xs = [statistics.median(p["rps"] for p in by_level[c]) for c in levels]
        ys = [statistics.median(p["p99_ms"] for p in by_level[c]) for c in levels]
        style = ":" if key[2] == "http" else "--" if key[1] == "perf_analyzer" else "-"
        color = colors.get(key[0], "black")
        label = f"{key[0]} ({key[2]} {key[3]}, {key[1]})"
        ax.plot(xs, ys, style, marker="o", color=color, label=label)
        for c, x, y in zip(levels, xs, ys, strict=True):
            ax.annotate(f"c={c}", (x, y), fontsize=7, alpha=0.7,
                        textcoords="offset points", xytext=(3, 3))  # fmt: skip
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms, log scale)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return None


def report(rows: list[dict[str, Any]], context: Mapping[str, Any], ratio_concurrency: int,
           out: Path, title: str) -> dict[str, Any]:  # fmt: skip
    """Print the table, ratios and notes; write results.json, results.csv and plot.png.

    Returns the summary: the headline ratios first, then ``context`` (machine, versions,
    configuration, skipped peers), the notes and every point.
    """
    table = ratios(rows)
    summary: dict[str, Any] = {
        **headline(table, ratio_concurrency),
        "ratios": table,
        "mlserver_tuning": [r for r in rows if r["phase"] == "tune"],
        "fixed_rate": next((r["rate"] for r in rows if r.get("rate")), None),
        "errors": sum(r["errors"] for r in rows if r["server"] == "riskwire"),
        "peer_errors": sum(r["errors"] for r in rows if r["server"] != "riskwire"),
        **context,
        "notes": list(NOTES),
        "out_dir": str(out),
        "points": rows,
    }
    print("\n" + format_table(rows))
    print("\nratios riskwire/peer (throughput > 1 and p99 < 1 favour riskwire):")
    print(format_ratios(table))
    for note in [*NOTES, *(f"skipped: {s}" for s in context.get("skipped", []))]:
        print(f"note: {note}")
    summary["plot"] = render_png(rows, out / "plot.png", title) or str(out / "plot.png")
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(out / "results.json")
    write_csv(rows, out / "results.csv")
    return summary
