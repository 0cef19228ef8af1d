"""Result files: results.json (one self-describing record per method) and results.csv (one row each)."""
from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any

CSV_COLUMNS = [
    "method", "status", "trainable_params", "total_params", "trainable_percent", "lr", "steps",
    "train_time_s", "train_samples_per_s", "train_tokens_per_s", "peak_memory_mb", "precision",
    "best_val.accuracy", "best_val.f1_macro", "best_val.loss", "best_val.step",
    "test.accuracy", "test.f1_macro", "test.loss", "artifact_size_mb", "artifact_dir", "error",
]


def write_results(out_dir: Path, records: list[dict[str, Any]], job_summary: dict[str, Any]) -> dict:
    payload = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "job": job_summary, "methods": records}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(out_dir / "results.json")  # readers never see a half-written file
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for record in records:
            writer.writerow([lookup(record, column) for column in CSV_COLUMNS])
    return payload


def lookup(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else value


def read_results(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "results.json").read_text())
