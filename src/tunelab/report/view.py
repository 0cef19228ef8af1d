"""What the report needs from a results.json, also from files written before tasks existed."""
from __future__ import annotations

import math
import re
from typing import Any

# results.json files from before the task layer: classification only, majority baseline in two fields.
LEGACY_METRICS = {"accuracy": "higher", "f1_macro": "higher", "loss": "lower"}


def job_view(payload: dict[str, Any]) -> dict[str, Any]:
    job = dict(payload.get("job") or {})
    job.setdefault("task", "classification")
    job.setdefault("metrics", LEGACY_METRICS)
    cfg = next((r["config"] for r in payload.get("methods", []) if r.get("config")), {})
    job.setdefault("metric_for_best", (cfg.get("train") or {}).get("metric_for_best") or "accuracy")
    if "baseline" not in job and "majority_baseline_validation" in job:
        job["baseline"] = {"name": "majority class",
                           "validation": {"accuracy": job["majority_baseline_validation"]},
                           "test": {"accuracy": job.get("majority_baseline_test")}}
    return job


def ordered_metrics(job: dict[str, Any]) -> list[str]:
    """The metric that picks the best checkpoint first, then the task's others."""
    primary = job["metric_for_best"]
    return [primary, *[m for m in job["metrics"] if m != primary]]


def arrow(job: dict[str, Any], metric: str) -> str:
    return "↑" if job["metrics"].get(metric, "higher") == "higher" else "↓"


def baseline_value(job: dict[str, Any], split: str, metric: str) -> float | None:
    return ((job.get("baseline") or {}).get(split) or {}).get(metric)


MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def md_text(value: Any) -> str:
    """Text from the data or a record (labels, prompts, answers, errors, names), shown as itself: on one line,
    with Markdown's special characters escaped (a `|` would split a table row, `[..](..)` make a link) and `&`
    and `<` as entities, so report.md shows no markup from data; report.html renders none either (html.py)."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(value).split())).replace("&", "&amp;").replace("<", "&lt;")


def plain_text(value: Any) -> str:
    """Text for a terminal: on one line, with no escapes (md_text's `\\_` would show as written there)."""
    return " ".join(str(value).split())


def metric_text(value: float | None, signed: bool = False) -> str:
    """A metric at three decimals, or three significant digits where three decimals would show 0.000 for a
    value that is not zero (a loss of 4e-4) or a long run of digits (a perplexity of 1e300)."""
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    sign = "+" if signed else ""
    if value != 0 and (abs(value) < 0.0095 or abs(value) >= 1e6):
        return format(value, f"{sign}.3g")
    return format(value, f"{sign}.3f")
