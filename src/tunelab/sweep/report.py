"""sweep.json, sweep.md and sweep.html: every trial of every study, the best configuration, learning rate against the
metric and optuna's parameter importances. Built from the study summaries alone."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..experiment.results import strict_json
from ..report.figures import sweep_importances, sweep_learning_rates
from ..report.html import write_html


def write_sweep(out_dir: Path, job: dict[str, Any], studies: dict[str, dict]) -> Path:
    (out_dir / "sweep.json").write_text(strict_json({"job": job, "studies": studies}) + "\n")
    lines = ["# tunelab sweep", ""]
    for method, study in studies.items():
        states = [t["state"] for t in study["trials"]]
        counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
        best = study["best"]
        scored = f" of best validation {study['metric']}" if study.get("metric") else ""
        lines += [f"## {method}", "", f"Study `{study['study']}` ({study['direction']}{scored}): {counts}.", ""]
        if best:
            params = ", ".join(f"`{k}` = {fmt(v)}" for k, v in best["params"].items())
            lines += [f"Best: trial {best['number']}, {best['value']:.4f} with {params}.", ""]
        unfit = [f"trial {t['number']} ({t['not_trained']})" for t in study["trials"] if t.get("not_trained")]
        if unfit:
            lines += ["Pruned without training, their drawn values refused: " + "; ".join(unfit) + ".", ""]
        failed = [f"trial {t['number']} ({t['error']})" for t in study["trials"] if t.get("error")]
        if failed:
            lines += ["Failed (records/ has each whole error): " + "; ".join(failed) + ".", ""]
        if study["importances"]:
            lines += ["Parameter importances (optuna): " + ", ".join(
                f"{k} {v:.2f}" for k, v in study["importances"].items()), ""]
        elif study.get("importances_note"):
            lines += [f"Parameter importances: {study['importances_note']}.", ""]
    folder = out_dir / "plots"
    folder.mkdir(exist_ok=True)
    plots = [p for p in (sweep_learning_rates(folder, studies, job), sweep_importances(folder, studies)) if p]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""] if plots else []
    path = out_dir / "sweep.md"
    text = "\n".join(lines)
    path.write_text(text, encoding="utf-8")
    write_html(out_dir, text, "tunelab sweep", "sweep.html")
    return path


def fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
