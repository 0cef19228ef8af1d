"""sweep.json and sweep.md: every trial of every study, the best configuration, learning rate against the
metric and optuna's parameter importances. Built from the study summaries alone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_sweep(out_dir: Path, job: dict[str, Any], studies: dict[str, dict]) -> Path:
    (out_dir / "sweep.json").write_text(json.dumps({"job": job, "studies": studies}, indent=2, default=str) + "\n")
    lines = ["# tunelab sweep", ""]
    for method, study in studies.items():
        states = [t["state"] for t in study["trials"]]
        counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
        best = study["best"]
        lines += [f"## {method}", "", f"Study `{study['study']}` ({study['direction']}): {counts}.", ""]
        if best:
            params = ", ".join(f"`{k}` = {fmt(v)}" for k, v in best["params"].items())
            lines += [f"Best: trial {best['number']}, {best['value']:.4f} with {params}.", ""]
        if study["importances"]:
            lines += ["Parameter importances (optuna): " + ", ".join(
                f"{k} {v:.2f}" for k, v in study["importances"].items()), ""]
    plot = lr_plot(out_dir, studies, job)
    if plot:
        lines += ["## Learning rate against the metric", "", f"![learning rate](plots/{plot.name})", ""]
    path = out_dir / "sweep.md"
    path.write_text("\n".join(lines))
    return path


def fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def lr_plot(out_dir: Path, studies: dict[str, dict], job: dict[str, Any]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for method, study in studies.items():
        points = [(t["params"][f"{method}.lr"], t["value"]) for t in study["trials"]
                  if t["state"] == "COMPLETE" and f"{method}.lr" in t["params"]]
        if points:
            ax.scatter(*zip(*points), label=method)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    metric = job.get("metric_for_best", "metric")
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"best validation {metric}",
           title="Completed trials: learning rate against the metric")
    ax.legend()
    (out_dir / "plots").mkdir(exist_ok=True)
    path = out_dir / "plots" / "sweep_lr.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
