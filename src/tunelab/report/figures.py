"""The report's plots, drawn from result records (and sweep.json's trials) alone.

Curves show the mean over a method's seeds with a band from the lowest to the highest seed; the trade-off
plots put each method's summary mean (with its 95 % interval) against its cost and mark the Pareto front: the
methods no other method beats on both the metric and the cost.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .view import arrow, ordered_metrics

COSTS = (("trainable_params", "trainable parameters", "log"), ("peak_memory_mb", "peak memory (MB)", "linear"),
         ("train_time_s", "train time (s)", "linear"))


def write_figures(out_dir: Path, records: list[dict], job: dict[str, Any], entries: list[dict],
                  studies: dict[str, dict] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    folder = out_dir / "plots"
    ok = [r for r in records if r["status"] == "success"]
    drawn: list[Path | None] = []
    colors = method_colors([e["method"] for e in entries] + [r["method"] for r in ok] + list(studies or {}))
    if ok or studies:
        folder.mkdir(exist_ok=True)
    if ok:
        metric = ordered_metrics(job)[0]
        groups = by_method(ok)
        drawn = [validation_curves(folder, groups, job, metric, colors), train_loss_curves(folder, groups, colors),
                 tradeoffs(folder, groups, job, entries, metric, colors)]
    if studies:  # a tuned comparison's trials, whether or not a final run succeeded (sweep.md shows them)
        drawn += [sweep_learning_rates(folder, studies, job, colors), sweep_importances(folder, studies)]
    drawn_now = [p for p in drawn if p is not None]
    # a plot an earlier build drew and this one does not (its runs failed since, its sweep is gone) would
    # contradict the report beside it
    for stale in set(folder.glob("*.png")) - set(drawn_now) if folder.is_dir() else ():
        stale.unlink()
    return drawn_now


def method_colors(methods: list[str]) -> dict[str, Any]:
    """One colour per method in every plot of the report (tab10, or tab20 beyond ten methods)."""
    import matplotlib

    unique = list(dict.fromkeys(methods))
    cmap = matplotlib.colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(unique)}


def by_method(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["method"], []).append(r)
    return groups


def mean_and_band(series: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps where every seed has a value (early stopping can end one sooner), mean, lowest and highest."""
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = np.array([[s[step] for step in steps] for s in series], dtype=float)
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def plot_band(ax, steps, mean, low, high, label: str, seeds: int, color=None) -> None:
    line, = ax.plot(steps, mean, marker="o" if len(steps) <= 30 else None, markersize=3, color=color,
                    label=f"{label} ({seeds} seeds)" if seeds > 1 else label)
    if seeds > 1:
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)


def validation_curves(folder: Path, groups: dict[str, list[dict]], job: dict, metric: str,
                      colors: dict[str, Any]) -> Path | None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for method, runs in groups.items():
        series = [{h["step"]: h[f"val_{metric}"] for h in r.get("history") or [] if h.get(f"val_{metric}") is not None}
                  for r in runs]
        if all(series):
            plot_band(ax, *mean_and_band(series), method, len(runs), colors.get(method))
            drawn = True
    title = f"Validation {metric} ({arrow(job, metric)}) by step: mean over seeds, band lowest–highest"
    return _finish(fig, ax, folder / f"validation_{metric}.png", "step", f"validation {metric}", title, drawn)


def train_loss_curves(folder: Path, groups: dict[str, list[dict]], colors: dict[str, Any]) -> Path | None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for method, runs in groups.items():
        series = [smoothed(r.get("losses") or []) for r in runs]
        if all(series):
            plot_band(ax, *mean_and_band(series), method, len(runs), colors.get(method))
            drawn = True
    title = "Training loss (↓) by step, moving average over a tenth of the run"
    return _finish(fig, ax, folder / "train_loss.png", "step", "training loss", title, drawn)


def smoothed(losses: list[float]) -> dict[int, float]:
    if not losses:
        return {}
    window = max(1, len(losses) // 10)
    kernel = np.ones(window) / window
    values = np.convolve(np.asarray(losses, dtype=float), kernel, mode="valid")
    return {step + window: float(v) for step, v in enumerate(values)}


def tradeoffs(folder: Path, groups: dict[str, list[dict]], job: dict, entries: list[dict], metric: str,
              colors: dict[str, Any]) -> Path | None:
    import matplotlib.pyplot as plt

    points = [(e["method"], e["metrics"][metric]) for e in entries
              if metric in e["metrics"] and e["metrics"][metric]["mean"] is not None]
    if not points:
        return None
    higher = job["metrics"].get(metric) == "higher"
    entry_of = {e["method"]: e for e in entries}
    best = next((e["metrics"][metric]["mean"] for e in entries if (e.get("verdict") or {}).get("result") == "best"),
                None)
    fig, axes = plt.subplots(1, len(COSTS), figsize=(15, 4.5), sharey=True)
    for ax, (key, label, scale) in zip(axes, COSTS):
        rows = [(method, float(np.mean([r[key] for r in groups[method]])), s) for method, s in points
                if method in groups and all(r.get(key) is not None for r in groups[method])]
        front = pareto_front([(cost, front_score(entry_of[method], metric, best)) for method, cost, _ in rows], higher)
        for i, (method, cost, s) in enumerate(rows):
            error = [[s["mean"] - s["ci95"][0]], [s["ci95"][1] - s["mean"]]] if s.get("ci95") else None
            ax.errorbar(cost, s["mean"], yerr=error, fmt="o", capsize=3, color=colors.get(method),
                        markeredgecolor="black" if i in front else None, markersize=8 if i in front else 6)
            ax.annotate(method, (cost, s["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ordered = sorted((rows[i][1], rows[i][2]["mean"]) for i in front)
        if ordered:
            ax.step(*zip(*ordered), where="post", color="black", linewidth=1, alpha=0.6, label="Pareto front")
            ax.legend(fontsize=8)
        ax.set(xscale=scale, xlabel=label)
    axes[0].set_ylabel(f"{entries[0]['split'].replace('best_val', 'best validation')} {metric} ({arrow(job, metric)})")
    fig.suptitle(f"{metric} against cost (95 % intervals); outlined: the Pareto front, where a tie with the best "
                 "counts as the best's score")
    path = folder / "tradeoffs.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def front_score(entry: dict, metric: str, best: float | None) -> float:
    """The score a method stands on the front with: the best's mean where the ranking calls it a tie with the
    best. On point estimates a dearer method tied with a cheaper one stayed on the front by noise alone."""
    if (entry.get("verdict") or {}).get("result") == "tie" and best is not None:
        return best
    return entry["metrics"][metric]["mean"]


def pareto_front(points: list[tuple[float, float]], higher: bool) -> set[int]:
    """Indices of points that no other point beats: at most the cost and at least the score, one strictly."""
    def better(a, b) -> bool:  # a dominates b
        score_ok = a[1] >= b[1] if higher else a[1] <= b[1]
        strictly = a[0] < b[0] or (a[1] > b[1] if higher else a[1] < b[1])
        return a[0] <= b[0] and score_ok and strictly

    return {i for i, p in enumerate(points) if not any(better(q, p) for j, q in enumerate(points) if j != i)}


def sweep_learning_rates(folder: Path, studies: dict[str, dict], job: dict,
                         colors: dict[str, Any] | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for method, study in studies.items():
        points = [(t["params"][f"{method}.lr"], t["value"]) for t in study["trials"]
                  if t["state"] == "COMPLETE" and f"{method}.lr" in t["params"]]
        if points:
            ax.scatter(*zip(*points), label=method, color=(colors or {}).get(method))
            drawn = True
    # the trials' values are sweep.metric's (a study says which), which may differ from metric_for_best
    metric = next((s["metric"] for s in studies.values() if s.get("metric")), job.get("metric_for_best", "metric"))
    ax.set_xscale("log")
    title = f"Tuning trials: learning rate against best validation {metric} ({arrow(job, metric)})"
    return _finish(fig, ax, folder / "sweep_lr.png", "learning rate", f"best validation {metric}", title, drawn)


def sweep_importances(folder: Path, studies: dict[str, dict]) -> Path | None:
    import matplotlib.pyplot as plt

    shown = {m: s["importances"] for m, s in studies.items() if s.get("importances")}
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.5), squeeze=False)
    for ax, (method, importances) in zip(axes[0], shown.items()):
        names = list(importances)[::-1]
        ax.barh([n.split(".", 1)[-1] for n in names], [importances[n] for n in names])
        ax.set(title=method, xlabel="importance (optuna, fANOVA)", xlim=(0, 1))
    fig.suptitle("Hyperparameter importances per method")
    path = folder / "sweep_importances.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, drawn: bool) -> Path | None:
    import matplotlib.pyplot as plt

    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
