"""Plots for docs/performance.md from bench/results/*.json (matplotlib PNGs into docs/img/).

matplotlib lives in the peers' environment, not in dms-worker's dependencies:

    bench/.venv-peers/bin/python bench/plots.py [--results bench/results] [--out docs/img]

Reads what the benchmarks wrote: burndown.json and pickup_latency.json (ours),
pgqueuer_burndown.json, pgqueuer_pickup.json, procrastinate_burndown.json,
procrastinate_pickup.json (the peers'), commit_rate.json (pgbench) and claim_scale.json; a
missing file only leaves its bars out. Draws:

- burndown_throughput.png: burn-down jobs/s per system, the pgbench -N TPS as a reference line;
- pickup_latency.png: pickup latency p50/p99 per system (log scale: polling is far slower);
- claim_scale.png: claim latency p50/p99 by queue size (when claim_scale.json is present).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[1]
OURS = "#1f6f8b"
PEER = "#b0b0b0"


def load(results: Path, name: str) -> Any:
    path = results / f"{name}.json"
    if not path.exists():
        print(f"  (no {path.name}: left out)")
        return None
    return json.loads(path.read_text())


def as_rows(data: Any) -> list[dict]:
    if data is None:
        return []
    if isinstance(data, list):
        return data
    for key in ("runs", "rows"):
        if isinstance(data.get(key), list):
            return data[key]
    return [data]


def burndown_bars(results: Path) -> list[tuple[str, float, bool, int | None]]:
    """(label, jobs/s, ours, jobs) per bar."""
    bars = []
    for row in as_rows(load(results, "burndown")):
        if "jobs_per_s" in row:
            label = row.get("label") or (f"dms-worker\n{row.get('replicas', 4)} replicas x {row.get('slots_each', 4)} slots"
                                         "\nfull bookkeeping")
            bars.append((label, float(row["jobs_per_s"]), True, row.get("jobs")))
    data = load(results, "pgqueuer_burndown")
    for row in as_rows(data):
        cfg = f"batch {row.get('batch_size')}, max tasks {row.get('max_concurrent_tasks') or 'none'}"
        bars.append((f"PgQueuer {data.get('version', '')}\n{cfg}", float(row["jobs_per_s"]), False, row.get("jobs")))
    data = load(results, "procrastinate_burndown")
    for row in as_rows(data):
        bars.append((f"Procrastinate {data.get('version', '')}\nconcurrency {row.get('concurrency')}",
                     float(row["jobs_per_s"]), False, row.get("jobs")))
    return bars


def plot_burndown(results: Path, out: Path) -> Path | None:
    bars = burndown_bars(results)
    if not bars:
        return None
    pgbench = load(results, "commit_rate")
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(bars)), 4.8))
    xs = range(len(bars))
    rects = ax.bar(xs, [b[1] for b in bars], color=[OURS if b[2] else PEER for b in bars], edgecolor="black", lw=0.5)
    for r, b in zip(rects, bars):
        ax.annotate(f"{b[1]:,.0f}", (r.get_x() + r.get_width() / 2, r.get_height()), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 2), textcoords="offset points")
    if pgbench and pgbench.get("tps"):
        tps = float(pgbench["tps"])
        ax.axhline(tps, color="#c0392b", ls="--", lw=1.2)
        ax.annotate(f"pgbench -N, {pgbench.get('clients', 4)} clients: {tps:,.0f} TPS", (len(bars) - 0.5, tps),
                    ha="right", va="bottom", color="#c0392b", fontsize=9, xytext=(0, 2), textcoords="offset points")
    counts = {b[3] for b in bars}
    same = len(counts) == 1 and None not in counts
    # Different job counts (a partial re-run) are shown on each bar rather than hidden.
    ax.set_xticks(list(xs), [b[0] if same or b[3] is None else f"{b[0]}\n({b[3]:,} jobs)" for b in bars], fontsize=8)
    ax.set_ylabel("jobs per second (higher is better)")
    what = f"{next(iter(counts)):,} no-op jobs" if same else "no-op jobs"
    ax.set_title(f"Burn-down of {what}, 4 worker processes, same PostgreSQL")
    ax.set_ylim(0, max([b[1] for b in bars] + [float(pgbench["tps"]) if pgbench and pgbench.get("tps") else 0]) * 1.15)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path = out / "burndown_throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pickup_rows(results: Path) -> list[tuple[str, float, float, bool]]:
    rows = []
    for row in as_rows(load(results, "pickup_latency")):
        rows.append((f"dms-worker\n{row.get('wake-up', '')}".replace(" (poll", "\n(poll"), row["p50_ms"], row["p99_ms"], True))
    for name, title in (("pgqueuer_pickup", "PgQueuer"), ("procrastinate_pickup", "Procrastinate")):
        data = load(results, name)
        for row in as_rows(data):
            rows.append((f"{title} {data.get('version', '')}\nLISTEN/NOTIFY", row["p50_ms"], row["p99_ms"], False))
    return rows


def plot_pickup(results: Path, out: Path) -> Path | None:
    rows = pickup_rows(results)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(rows)), 4.8))
    width = 0.38
    for i, (label, p50, p99, ours) in enumerate(rows):
        color = OURS if ours else PEER
        for dx, value, hatch in ((-width / 2, p50, None), (width / 2, p99, "//")):
            ax.bar(i + dx, value, width, color=color, edgecolor="black", lw=0.5, hatch=hatch)
            ax.annotate(f"{value:,.1f}", (i + dx, value), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("commit -> handler start, ms (log scale, lower is better)")
    ax.set_title("Pickup latency at low load, one job at a time: p50 (plain) and p99 (hatched)")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path = out / "pickup_latency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_claim_scale(results: Path, out: Path) -> Path | None:
    data = load(results, "claim_scale")
    rows = as_rows(data)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    width = 0.38
    for i, row in enumerate(rows):
        for dx, key, hatch in ((-width / 2, "p50_ms", None), (width / 2, "p99_ms", "//")):
            ax.bar(i + dx, row[key], width, color=OURS, edgecolor="black", lw=0.5, hatch=hatch)
            ax.annotate(f"{row[key]:,.1f}", (i + dx, row[key]), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(rows)), [f"{row['queued_new']:,} NEW rows" for row in rows])
    ax.set_ylabel("request_claim(4 rows), ms")
    ratio = data.get("p50_ratio_largest_to_smallest") if isinstance(data, dict) else None
    ax.set_title("Claim latency by queue size: p50 (plain), p99 (hatched)"
                 + (f"\np50 ratio {ratio}x" if ratio is not None else ""))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path = out / "claim_scale.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for plot in (plot_burndown, plot_pickup, plot_claim_scale):
        path = plot(args.results, args.out)
        print(f"{plot.__name__}: {path or 'nothing to plot'}")
    pgbench = load(args.results, "commit_rate")
    if pgbench and pgbench.get("tps"):
        print(f"\nburn-down as a fraction of the commit rate (pgbench -N: {pgbench['tps']:,.0f} TPS)")
        for label, rate, _ours, jobs in burndown_bars(args.results):
            print(f"  {label.replace(chr(10), ', '):<60} {rate:>8,.1f} jobs/s  {100 * rate / pgbench['tps']:5.1f} %"
                  + (f"  ({jobs:,} jobs)" if jobs else ""))


if __name__ == "__main__":
    main()
