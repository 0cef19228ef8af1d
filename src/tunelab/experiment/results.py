"""Result files: results.json (one self-describing record per method) and results.csv (one row each)."""
from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TunelabInputError

LEADING_COLUMNS = [
    "method", "run_id", "seed", "status", "trainable_params", "total_params", "trainable_percent", "lr", "steps",
    "train_time_s", "train_samples_per_s", "train_tokens_per_s", "peak_memory_mb", "precision",
]
TRAILING_COLUMNS = ["artifact_size_mb", "artifact_dir", "error"]


def csv_columns(metrics: list[str]) -> list[str]:
    """One row per run: measurements, then the task's metrics for the best checkpoint and on test."""
    return [*LEADING_COLUMNS, *[f"best_val.{m}" for m in metrics], "best_val.step",
            *[f"test.{m}" for m in metrics], *TRAILING_COLUMNS]


def write_results(out_dir: Path, records: list[dict[str, Any]], job_summary: dict[str, Any]) -> dict:
    from ..report.summary import summarize
    from ..report.view import job_view

    payload = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "job": job_summary, "methods": records}
    payload["summary"] = summarize(records, job_view(payload))
    save_results(out_dir, payload)
    return payload


def save_results(out_dir: Path, payload: dict) -> None:
    """results.json and results.csv (one row per run) of `payload`."""
    from ..report.view import job_view

    records = payload["methods"]
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(strict_json(payload) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "results.json")  # readers never see a half-written file
    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        # the job as the report reads it: files of earlier versions name no metrics (classification's are meant)
        columns = csv_columns(list(job_view(payload).get("metrics", {})))
        writer.writerow(columns)
        for record in records:
            writer.writerow([lookup(record, column) for column in columns])


def strict_json(payload: Any) -> str:
    """JSON that any parser reads: a NaN or infinity that got into a record (Python writes them as bare NaN and
    Infinity, which JavaScript, jq and most other readers reject) is written as null."""
    try:
        return json.dumps(payload, indent=2, default=str, allow_nan=False)
    except ValueError:
        return json.dumps(json_safe(payload), indent=2, default=str)


def json_safe(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers, and strict readers (jq, most languages) refuse them.
    numpy values (Parquet's list cells arrive as arrays) as the Python values they hold, not their repr."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def lookup(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else value


def read_results(out_dir: Path) -> dict:
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        what = "does not exist" if not Path(out_dir).exists() else "has no results.json"
        raise TunelabInputError([f"{str(out_dir)!r} {what}: give the --output folder of a compare, which holds "
                                 "results.json once its first run has finished"])
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TunelabInputError([f"{str(path)!r} is not a readable results file: {exc}"]) from None
    methods = payload.get("methods") if isinstance(payload, dict) else None
    if not isinstance(methods, list) or not all(isinstance(r, dict) and isinstance(r.get("method"), str)
                                                and isinstance(r.get("status"), str) for r in methods):
        raise TunelabInputError([f"{str(path)!r} is not a results file: expected an object whose \"methods\" is a "
                                 "list of records, each with a \"method\" and a \"status\""])
    return payload


def content_problems(payload: dict, job: dict) -> list[str]:
    """What the report reads beyond method and status, checked where a hand edit could break it: the metric
    that ranks is one of the job's, metric values are numbers (or null), each history entry has its step."""
    problems = []
    if job.get("metric_for_best") not in (job.get("metrics") or {}):
        problems.append(f"job.metric_for_best: {job.get('metric_for_best')!r} is not one of job.metrics "
                        f"({', '.join(job.get('metrics') or {}) or 'none'})")
    for i, record in enumerate(payload["methods"]):
        where = f"methods[{i}] ({record['method']})"
        for split in ("best_val", "test"):
            values = record.get(split)
            if values is not None and not isinstance(values, dict):
                problems.append(f"{where}.{split}: must be an object of metric values, not {values!r}")
                continue
            problems += [f"{where}.{split}.{metric}: {value!r} is not a number (or null)"
                         for metric, value in (values or {}).items()
                         if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)))]
        history = record.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, dict) and isinstance(h.get("step"), int)
                                                    for h in history):
            problems.append(f"{where}.history: every entry must be an object with an integer \"step\"")
    return problems

