"""The report's plots: the best-checkpoint metric against trainable parameters, validation curves, train loss."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .view import arrow, ordered_metrics


def write_plots(out_dir: Path, records: list[dict], job: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "success"]
    if not ok:
        return []
    metric = ordered_metrics(job)[0]
    label = f"{metric} ({arrow(job, metric)})"
    folder = out_dir / "plots"
    folder.mkdir(exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in ok:
        score = (r.get("test") or r["best_val"])[metric]
        ax.scatter(r["trainable_params"], score, s=60)
        ax.annotate(r["method"], (r["trainable_params"], score), textcoords="offset points", xytext=(5, 5))
    ax.set(xscale="log", xlabel="trainable parameters", ylabel=label, title=f"{metric} vs trainable parameters")
    paths.append(_save(fig, folder / f"{metric}_vs_params.png"))
    for key, title, name in ((f"val_{metric}", f"validation {label}", f"validation_{metric}"),
                             ("train_loss", "training loss (↓)", "train_loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in ok:
            points = [(h["step"], h[key]) for h in r["history"] if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=r["method"])
        ax.set(xlabel="step", ylabel=title, title=title[0].upper() + title[1:])
        ax.legend()
        paths.append(_save(fig, folder / f"{name}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
