"""The local results store: every `compare` appends one row per method summary, so `recommend` can say what
was measured for models of a similar size on the same task. SQLite in the user's data folder
(TUNELAB_RESULTS_DB overrides the path)."""
from __future__ import annotations

import datetime as dt
import os
import sqlite3
from pathlib import Path
from typing import Any

SCHEMA = """CREATE TABLE IF NOT EXISTS results (
    created TEXT, task TEXT, model TEXT, total_params INTEGER, train_rows INTEGER, method TEXT,
    metric TEXT, higher_is_better INTEGER, mean REAL, ci_low REAL, ci_high REAL, runs INTEGER,
    peak_memory_mb REAL, train_time_s REAL, experiment TEXT)"""


def store_path() -> Path:
    default = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "tunelab" / "results.db"
    return Path(os.environ.get("TUNELAB_RESULTS_DB", default))


def connect() -> sqlite3.Connection:
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    connection.execute(SCHEMA)
    return connection


def append_summary(out_dir: Path, payload: dict[str, Any]) -> int:
    """One row per summarised method of a finished comparison, replacing what the same experiment folder
    wrote before (a resumed comparison is one experiment, not two); rows written."""
    job, summary = payload.get("job") or {}, payload.get("summary") or []
    metric = job.get("metric_for_best")
    records = [r for r in payload.get("methods", []) if r.get("status") == "success"]
    if not metric or not summary or not records or not trained_enough(records):
        return 0
    rows = []
    for entry in summary:
        stats = entry["metrics"].get(metric) or {}
        mine = [r for r in records if r["method"] == entry["method"]]
        ci = stats.get("ci95") or [None, None]
        rows.append((dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), job.get("task"),
                     job.get("model_path"), mine[0].get("total_params") if mine else None, job.get("train_rows"),
                     entry["method"], metric, int(job["metrics"].get(metric) == "higher"), stats.get("mean"),
                     ci[0], ci[1], entry.get("n"), mean_of(mine, "peak_memory_mb"), mean_of(mine, "train_time_s"),
                     str(Path(out_dir).resolve())))
    with connect() as connection:
        earlier = (str(out_dir), str(Path(out_dir).resolve()))  # rows written before paths were resolved too
        connection.execute("DELETE FROM results WHERE experiment IN (?, ?)", earlier)
        connection.executemany(f"INSERT INTO results VALUES ({', '.join('?' * 15)})", rows)
    return len(rows)


MIN_STEPS = 200  # or one whole epoch: a smoke test's few steps say nothing about which method is better


def trained_enough(records: list[dict]) -> bool:
    """Whether a comparison's training was long enough to tell `recommend` something."""
    return all((r.get("steps") or 0) >= MIN_STEPS or (r.get("epochs_completed") or 0) >= 1 or r.get("stopped_early")
               for r in records)


def mean_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def similar_results(task: str, total_params: int, metric: str | None = None,
                    factor: float = 4.0) -> list[dict[str, Any]]:
    """Stored rows of the same task for models within `factor`× the size, newest first; only those scored
    by `metric` where given (each row holds its comparison's metric_for_best)."""
    if not store_path().is_file():
        return []
    query = "SELECT * FROM results WHERE task = ? AND total_params BETWEEN ? AND ?"
    args: list[Any] = [task, total_params / factor, total_params * factor]
    if metric is not None:
        query, args = query + " AND metric = ?", [*args, metric]
    with connect() as connection:
        connection.row_factory = sqlite3.Row
        return [dict(r) for r in connection.execute(query + " ORDER BY created DESC", args)]
