"""Figures and results files shared by every benchmark, ours and the peers'.

Standard library only: the peers' scripts run in bench/.venv-peers, which has neither SQLAlchemy
nor dms-worker, and must compute p50/p99 exactly as ours do (linear interpolation between
closest ranks).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "mean_ms": round(statistics.fmean(ms), 2), "max_ms": round(max(ms), 2)}


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    cols = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  " + "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  " + "  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))


def write_json(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user+system) of a live process, from /proc (Linux)."""
    import os
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds used so far by the processes ``roots`` and every live descendant (the
    replicas and their execution processes, or a peer's consumers). Sample before and after:
    the difference is what the workers spent, the database server excluded."""
    import os
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _proc_stat(int(name))) is not None:
            stats[int(name)] = st
    wanted, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in wanted or pid not in stats:
            continue
        wanted.add(pid)
        todo += [child for child, (ppid, _) in stats.items() if ppid == pid]
    return sum(stats[pid][1] for pid in wanted)


def table_writes(scalar_sql: Any, tables: list[str]) -> dict[str, int]:
    """Rows inserted, updated and deleted so far in ``tables`` (pg_stat_user_tables; read after
    the workers' sessions ended, which flushes their statistics). ``scalar_sql(sql)`` runs a
    query and returns its first column of the first row."""
    names = ", ".join(f"'{t}'" for t in tables)
    return {kind: int(scalar_sql(f"SELECT coalesce(sum(n_tup_{kind}), 0) FROM pg_stat_user_tables "
                                 f"WHERE relname IN ({names})") or 0) for kind in ("ins", "upd", "del")}
