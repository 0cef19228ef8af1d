"""The comparison report, built from results.json alone (so it can be rebuilt for old experiments)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

CLEAR_MARGIN = 0.02  # accuracy points over the majority baseline that count as "learned something"


def fmt(value: Any, spec: str = "") -> str:
    if value is None or value == "":
        return "–"
    return format(value, spec) if spec else str(value)


def human_count(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def table(records: list[dict]) -> list[str]:
    lines = ["| method | status | trainable params | % of total | peak memory (MB) | train time (s) | "
             "samples/s | tokens/s | best val acc | best val F1 | test acc | test F1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        val, test = r.get("best_val") or {}, r.get("test") or {}
        lines.append(" | ".join([
            f"| {r['method']}", r["status"], human_count(r.get("trainable_params")),
            fmt(r.get("trainable_percent"), ".3f"), fmt(r.get("peak_memory_mb"), ".0f"),
            fmt(r.get("train_time_s"), ".1f"), fmt(r.get("train_samples_per_s"), ".1f"),
            fmt(r.get("train_tokens_per_s"), ".0f"), fmt(val.get("accuracy"), ".3f"),
            fmt(val.get("f1_macro"), ".3f"), fmt(test.get("accuracy"), ".3f"), fmt(test.get("f1_macro"), ".3f"),
        ]) + " |")
    return lines


def reading(records: list[dict], job: dict) -> list[str]:
    """A few plain sentences drawn from the numbers; no claim is made that the table does not show."""
    ok = [r for r in records if r["status"] == "success"]
    notes = []
    for r in records:
        if r["status"] != "success":
            notes.append(f"- **{r['method']}** did not finish ({r['status']}): {r.get('error')}")
    if not ok:
        return notes or ["- No method finished."]
    split = "test" if all(r.get("test") for r in ok) else "best_val"
    baseline = job.get("majority_baseline_test" if split == "test" else "majority_baseline_validation")
    acc = {r["method"]: r[split]["accuracy"] for r in ok}
    best = max(acc, key=acc.get)
    notes.append(f"- Highest {split.replace('_', ' ')} accuracy: **{best}** ({acc[best]:.3f}); the majority-class "
                 f"baseline is {baseline:.3f}.")
    weak = [m for m, a in acc.items() if baseline is not None and a < baseline + CLEAR_MARGIN]
    if weak:
        notes.append(f"- Not clearly above the majority baseline (< +{CLEAR_MARGIN:.0%}): {', '.join(weak)}. "
                     "These need more steps, a different learning rate, or more data before they say anything.")
    close = [r for r in ok if acc[r["method"]] >= acc[best] - CLEAR_MARGIN]
    lean = min(close, key=lambda r: r["trainable_params"])
    if lean["method"] != best:
        notes.append(f"- **{lean['method']}** comes within {CLEAR_MARGIN:.0%} of the best while training "
                     f"{human_count(lean['trainable_params'])} parameters ({lean['trainable_percent']:.2f} % of "
                     f"the model), and saves a {lean['artifact_size_mb']:.1f} MB artifact.")
    fastest = max(ok, key=lambda r: r["train_samples_per_s"])
    slowest = min(ok, key=lambda r: r["train_samples_per_s"])
    notes.append(f"- Fastest to train: **{fastest['method']}** ({fastest['train_samples_per_s']:.1f} samples/s, "
                 f"{fastest['train_samples_per_s'] / slowest['train_samples_per_s']:.2f}× {slowest['method']}).")
    low_mem = min(ok, key=lambda r: r["peak_memory_mb"])
    notes.append(f"- Lowest peak memory: **{low_mem['method']}** ({low_mem['peak_memory_mb']:.0f} MB).")
    return notes


def write_report(out_dir: Path, payload: dict) -> Path:
    records, job = payload["methods"], payload["job"]
    plots = write_plots(out_dir, records)
    cfg = next((r["config"] for r in records if r.get("config")), {})
    train = cfg.get("train", {})
    lines = [
        "# tunelab comparison", "",
        f"Model `{job.get('model_path')}`; {job.get('train_rows')} train / {job.get('validation_rows')} "
        f"validation ({job.get('validation_source')}) / {job.get('test_rows')} test rows; labels "
        f"{', '.join(map(str, job.get('labels', [])))}. Every method: {train.get('epochs')} epoch(s), batch "
        f"{train.get('batch_size')}, max length {cfg.get('data', {}).get('max_length')}, seed {train.get('seed')}.",
        "", *table(records), "",
        f"Majority-class baseline: validation {fmt(job.get('majority_baseline_validation'), '.3f')}, "
        f"test {fmt(job.get('majority_baseline_test'), '.3f')}. Test numbers are for the checkpoint with the "
        f"best validation {train.get('metric_for_best', 'accuracy')}; time and throughput count training steps "
        "only (evaluation excluded); peak memory is the process's resident set while the method trained.",
        "", "## Reading", "", *reading(records, job), "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(out_dir: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "success"]
    if not ok:
        return []
    folder = out_dir / "plots"
    folder.mkdir(exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in ok:
        score = (r.get("test") or r["best_val"])["accuracy"]
        ax.scatter(r["trainable_params"], score, s=60)
        ax.annotate(r["method"], (r["trainable_params"], score), textcoords="offset points", xytext=(5, 5))
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="accuracy", title="Accuracy vs trainable parameters")
    paths.append(_save(fig, folder / "accuracy_vs_params.png"))
    for key, label, name in (("val_accuracy", "validation accuracy", "validation_accuracy"),
                             ("train_loss", "training loss", "train_loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in ok:
            points = [(h["step"], h[key]) for h in r["history"] if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=r["method"])
        ax.set(xlabel="step", ylabel=label, title=label.capitalize())
        ax.legend()
        paths.append(_save(fig, folder / f"{name}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
