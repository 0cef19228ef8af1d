"""report.md: the comparison table, the baseline, a plain-language reading and the plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from . import stats
from .figures import write_figures
from .html import write_html
from .summary import interval_text, summarize
from .view import arrow, baseline_value, job_view, md_text, metric_text, ordered_metrics


def fmt(value: Any, spec: str = "") -> str:
    if value is None or value == "":
        return "–"
    return format(value, spec) if spec else str(value)


def human_count(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def table(records: list[dict], job: dict[str, Any], text: Callable[[Any], str] = md_text) -> list[str]:
    """The results table in Markdown; `text` writes names and statuses (plain_text for a terminal)."""
    metrics = ordered_metrics(job)
    headers = ["method", "status", "trainable params", "% of total", "peak memory (MB)", "train time (s)",
               "samples/s", "tokens/s", f"best val {metrics[0]} {arrow(job, metrics[0])}",
               *[f"test {m} {arrow(job, m)}" for m in metrics]]
    lines = ["| " + " | ".join(headers) + " |", "|---|---|" + "---:|" * (len(headers) - 2)]
    for r in records:
        val, test = r.get("best_val") or {}, r.get("test") or {}
        lines.append(" | ".join([
            f"| {text(r.get('run_id', r['method']))}", text(r["status"]), human_count(r.get("trainable_params")),
            fmt(r.get("trainable_percent"), ".3f"), fmt(r.get("peak_memory_mb"), ".0f"),
            fmt(r.get("train_time_s"), ".1f"), fmt(r.get("train_samples_per_s"), ".1f"),
            fmt(r.get("train_tokens_per_s"), ".0f"), metric_text(val.get(metrics[0])),
            *[metric_text(test.get(m)) for m in metrics]]) + " |")
    return lines


def ranking(entries: list[dict], job: dict[str, Any]) -> list[str]:
    """Methods ranked by the metric that picks the best checkpoint, each with its interval and its verdict
    against the best: a difference the test cannot tell from noise is a tie."""
    if not entries:
        return []
    metrics = ordered_metrics(job)
    split = "test" if entries[0]["split"] == "test" else "best validation"
    lines = [f"## Ranking ({split} {metrics[0]}, {'higher' if job['metrics'][metrics[0]] == 'higher' else 'lower'} "
             "is better)", "",
             "| rank | method | runs | " + " | ".join(f"{m} {arrow(job, m)} (95 % CI)" for m in metrics) +
             " | against the best |", "|---:|---|---:|" + "---|" * (len(metrics) + 1)]
    for e in entries:
        lines.append(f"| {e['rank']} | {md_text(e['method'])} | {e['n']} | " +
                     " | ".join(interval_text(e["metrics"][m]) for m in metrics) + f" | {verdict_text(e['verdict'])} |")
    methods_used = sorted({e["metrics"][metrics[0]]["ci_method"] for e in entries if e["metrics"][metrics[0]]["ci95"]})
    untested = any(e["verdict"]["result"] == "untested" for e in entries)
    tests_used = sorted({e["verdict"]["test"] for e in entries
                         if e["verdict"].get("test") and e["verdict"]["result"] != "untested"})
    pairs = max((e["verdict"].get("holm_pairs") or 0 for e in entries), default=0)
    holm = (f", p-values adjusted by Holm's method over all {pairs} pairs of ranked methods (the best is picked "
            "after seeing the scores, so each comparison with it stands for any pair)" if pairs else "")
    verdicts = (f"Verdicts: {', '.join(tests_used)} at the 5 % level{holm}; \"tie\" means the difference is within "
                "what chance explains, not that the methods are equal." if tests_used else
                "" if untested else
                "No method was tested against the best (no two finished methods with results to compare).")
    if untested:
        verdicts += (" " if verdicts else "") + ("\"untested\": no test could be run (no per-example test "
                                                  "results to resample, and one run each or the same difference on "
                                                  "every seed), so the difference may be noise or not.")
    no_interval = "none (one run per method, and no per-example test results of two or more examples to bootstrap)"
    lines += ["", f"Intervals: {', '.join(methods_used) or no_interval}. {verdicts}{zero_width_note(entries, metrics)}",
              ""]
    return lines


def zero_width_note(entries: list[dict], metrics: list[str]) -> str:
    """An interval of zero width (every test example right, or seeds and examples that all agree) is where the
    resampling has nothing to vary, not where there is no uncertainty."""
    def zero_width(summary: dict) -> bool:
        return bool(summary.get("ci95")) and summary["ci95"][0] == summary["ci95"][1]
    flat = sorted({e["method"] for e in entries for m in metrics if zero_width(e["metrics"][m])})
    if not flat:
        return ""
    return (f" An interval of zero width ({', '.join(map(md_text, flat))}) means every resample gave the same value "
            "(every test example scored alike), not that the score is certain: a larger test split would show "
            "its spread (all n answers right still allows an error rate up to about 3/n).")


def seeds_text(records: list[dict], train: dict) -> str:
    seeds = sorted({r["seed"] for r in records if r.get("seed") is not None}) or [train.get("seed")]
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"


def verdict_text(verdict: dict) -> str:
    if verdict["result"] == "best":
        return "best"
    if verdict["result"] == "unranked":
        return "unranked (no finite value)"
    p_value = verdict.get("p_value")
    p = "" if p_value is None else f", p {p_text(p_value)}"
    seeds = verdict.get("on_seeds") or []
    on = f" on seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} only" if seeds else ""
    return f"{verdict['result']} ({metric_text(verdict['mean_difference'], signed=True)}{on}{p})"


def p_text(p_value: float) -> str:
    """'< 0.001', or the p-value at three decimals, with more where three would round it onto or across the
    5 % line (0.0495 and 0.0505 both print as 0.050, one a "worse", the other a "tie")."""
    if p_value < 0.001:
        return "< 0.001"
    for decimals in range(3, 7):
        shown = round(p_value, decimals)
        if shown != stats.ALPHA and (shown < stats.ALPHA) == (p_value < stats.ALPHA):
            break
    return f"= {p_value:.{decimals}f}"


def baseline_lines(job: dict[str, Any]) -> list[str]:
    baseline = job.get("baseline") or {}
    if not baseline:
        return []
    parts = []
    for split in ("validation", "test"):
        values = baseline.get(split) or {}
        shown = ", ".join(f"{m} {metric_text(values.get(m))}" for m in ordered_metrics(job) if m in values)
        if shown:
            parts.append(f"{split}: {shown}")
    return [f"Baseline ({md_text(baseline.get('name', 'reference'))}): {'; '.join(parts)}."]


def reading(records: list[dict], job: dict[str, Any], entries: list[dict]) -> list[str]:
    """Plain sentences drawn from the summary: only what its intervals and verdicts support."""
    ok = [r for r in records if r["status"] == "success"]
    notes = [f"- **{md_text(r.get('run_id', r['method']))}** did not finish ({md_text(r['status'])}): "
             f"{md_text(r.get('error'))}" for r in records if r["status"] != "success"]
    notes += not_run_yet(records) + mixed_settings(records)
    if not entries:
        return notes or ["- No method finished."]
    metric = ordered_metrics(job)[0]
    higher = job["metrics"].get(metric) == "higher"
    best = entries[0]
    if best["verdict"]["result"] == "unranked":  # ranked last are those without a value: here, every method
        return notes + [f"- No method has a finite {metric} (each diverged, or gave none): nothing is ranked."]
    split = "test" if best["split"] == "test" else "validation (best checkpoint)"
    notes.append(f"- Best {split} {metric} ({'higher' if higher else 'lower'} is better): "
                 f"**{md_text(best['method'])}**, {interval_text(best['metrics'][metric])}.")
    named = {result: [md_text(e["method"]) for e in entries[1:] if e["verdict"]["result"] == result]
             for result in ("tie", "untested", "worse", "mixed", "unranked")}
    if named["tie"]:
        notes.append(f"- Not distinguishable from the best at this sample size (ties): {', '.join(named['tie'])}.")
    if named["untested"]:
        seeded = any(e["n"] > 1 for e in entries)
        notes.append(f"- Not tested against the best (no per-example test results, and "
                     f"{'the same difference on every seed' if seeded else 'one run each'}): "
                     f"{', '.join(named['untested'])}; whether the gap is noise is unknown: "
                     f"{'' if seeded else '`--seeds 3`, or '}a test split (data.test_file) gives a test.")
    if named["worse"]:
        notes.append(f"- Worse than the best beyond chance: {', '.join(named['worse'])} (a paired test, on the same "
                     "seeds and test examples: the intervals above, each of one method, may still overlap).")
    if named["mixed"]:
        notes.append(f"- Ranked below the best by the mean over its seeds, but better than it beyond chance on the "
                     f"seeds both ran (another seed failed or is missing): {', '.join(named['mixed'])}.")
    if named["unranked"]:
        notes.append(f"- No finite {metric} (a run diverged, or gave none): {', '.join(named['unranked'])}; "
                     "ranked last.")
    reference = baseline_value(job, "test" if best["split"] == "test" else "validation", metric)
    if reference is not None:
        valued = [e for e in entries if e["metrics"][metric]["mean"] is not None]
        weak = [md_text(e["method"]) for e in valued if e["metrics"][metric].get("ci95")
                and not clearly_beats(e["metrics"][metric], reference, higher)]
        unknown = [md_text(e["method"]) for e in valued if not e["metrics"][metric].get("ci95")]
        if weak:
            notes.append(f"- Not clearly better than the baseline ({metric_text(reference)}; its interval reaches "
                         f"it): {', '.join(weak)}. These need more steps, a tuned learning rate, or more data "
                         "before they say anything.")
        if unknown:
            notes.append(f"- No interval to set against the baseline ({metric_text(reference)}): "
                         f"{', '.join(unknown)}; whether they beat it beyond chance is unknown.")
    ties = [e["method"] for e in entries[1:] if e["verdict"]["result"] == "tie"]
    return notes + lean_note(ok, best["method"], ties) + cost_notes(ok)


def not_run_yet(records: list[dict]) -> list[str]:
    """Methods the config asked for that have no record (an interrupted comparison's report)."""
    asked = next((r["config"].get("methods") for r in records if isinstance(r.get("config"), dict)), None) or []
    missing = [m for m in asked if m not in {r["method"] for r in records}]
    return [f"- Not run (the comparison stopped before them): {', '.join(map(md_text, missing))}."] if missing else []


SHARED_SECTIONS = ("task", "model", "data", "train")  # what every run of a fair comparison trains with


def mixed_settings(records: list[dict]) -> list[str]:
    """Settings that differ between the finished runs (a results.json put together from several experiments,
    or edited): the header states the first run's, and the ranking would compare unlike runs. A run's seed and
    its tuned values (`hyperparameters`) differ by design."""
    seen: dict[str, dict[str, list[str]]] = {}
    for r in records:
        if r.get("status") != "success" or not isinstance(r.get("config"), dict):
            continue
        tuned = set(r.get("hyperparameters") or {})
        for key, value in flat_settings(r["config"]).items():
            if key != "train.seed" and key not in tuned:
                seen.setdefault(key, {}).setdefault(repr(value), []).append(r.get("run_id", r["method"]))
    mixed = {key: values for key, values in seen.items() if len(values) > 1}
    if not mixed:
        return []
    shown = "; ".join(f"`{key}` " + ", ".join(f"{md_text(value)} ({', '.join(map(md_text, runs))})"
                                             for value, runs in values.items())
                      for key, values in list(mixed.items())[:5])
    more = f"; {len(mixed) - 5} more" if len(mixed) > 5 else ""
    return [f"- **Runs trained with different settings**, so this is not one comparison: {shown}{more}."]


def flat_settings(config: dict) -> dict[str, object]:
    flat: dict[str, object] = {}
    for section in SHARED_SECTIONS:
        values = config.get(section)
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        elif section in config:  # `task` is a name, not a section of keys
            flat[section] = values
    return flat


def lean_note(ok: list[dict], best: str, ties: list[str]) -> list[str]:
    first = {r["method"]: r for r in reversed(ok) if r.get("trainable_params") is not None}
    candidates = [first[m] for m in [best, *ties] if m in first]
    if not candidates:
        return []
    lean = min(candidates, key=lambda r: r["trainable_params"])
    if lean["method"] == best:
        return []
    share = f" ({lean['trainable_percent']:.2f} % of the model)" if lean.get("trainable_percent") is not None else ""
    size = (f", and saves a {size_text(lean['artifact_size_mb'])} artifact" if lean.get("artifact_size_mb") is not None
            else "")
    return [f"- **{md_text(lean['method'])}** ties with the best while training "
            f"{human_count(lean['trainable_params'])} parameters{share}{size}."]


def size_text(mb: float) -> str:
    """A small adapter's size in KB: 0.019 MB is not "0.0 MB"."""
    return f"{mb:.1f} MB" if mb >= 1 else f"{mb * 1024:.0f} KB"


def cost_notes(ok: list[dict]) -> list[str]:
    """Fastest and leanest in memory, claimed only where every run of one method beats every run of the others
    by more than run-to-run variation could (COST_MARGIN): timings on a shared machine vary by several %."""
    notes = []
    speed = runs_of(ok, "train_samples_per_s")
    fastest = clear_extreme(speed, higher=True)
    if fastest:
        slowest = min(speed, key=lambda m: max(speed[m]))
        # one run of a method says nothing of its timing's own variation (other work on the machine, a short run)
        once = sorted(m for m, v in speed.items() if len(v) == 1)
        single = "" if not once else " One run each: how much these timings vary between runs was not measured." \
            if len(once) == len(speed) else f" One run of {', '.join(map(md_text, once))}: how much " \
            f"{'its timing varies' if len(once) == 1 else 'their timings vary'} between runs was not measured."
        notes.append(f"- Fastest to train: **{md_text(fastest)}** ({mean(speed[fastest]):.1f} samples/s, "
                     f"{mean(speed[fastest]) / mean(speed[slowest]):.2f}× {md_text(slowest)}).{single}")
    elif len(speed) > 1:
        notes.append("- Training speed: no method is faster than the others beyond run-to-run variation.")
    memory = runs_of(ok, "peak_memory_mb")
    low = clear_extreme(memory, higher=False)
    own = ", each run in its own process" if ok and all(r.get("pid") for r in ok) else ""
    if low:
        notes.append(f"- Lowest peak memory: **{md_text(low)}** ({mean(memory[low]):.0f} MB{own}).")
    elif len(memory) > 1:
        notes.append("- Peak memory: no method needs clearly less than the others.")
    return notes


COST_MARGIN = 0.05


def clear_extreme(values: dict[str, list[float]], higher: bool) -> str | None:
    if len(values) < 2:
        return None
    pick = max if higher else min
    leader = pick(values, key=lambda m: mean(values[m]))
    worst_of_leader = min(values[leader]) if higher else max(values[leader])
    others = [v for m, runs in values.items() if m != leader for v in runs]
    if higher:
        return leader if worst_of_leader > max(others) * (1 + COST_MARGIN) else None
    return leader if worst_of_leader < min(others) * (1 - COST_MARGIN) else None


def runs_of(records: list[dict], key: str) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for r in records:
        if isinstance(r.get(key), (int, float)):
            values.setdefault(r["method"], []).append(float(r[key]))
    return values


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def clearly_beats(summary: dict, reference: float, higher: bool) -> bool:
    """The whole interval is on the better side of the reference, by more than the printed digits show: a bound
    printed as the baseline's own value is not clearly above it."""
    low, high = summary["ci95"]
    bound = low if higher else high
    return (bound > reference if higher else bound < reference) and metric_text(bound) != metric_text(reference)


def task_lines(payload: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """What the task adds (e.g. sample generations); nothing for a task no longer installed."""
    from ..tasks.base import registry

    task = registry().get(job["task"])
    return task.report_lines({**payload, "job": job}) if task else []


def training_length(train: dict[str, Any], job: dict[str, Any]) -> str:
    """What every method was given to train: train.max_steps wins over train.epochs, as in the loop."""
    steps, batch, rows = train.get("max_steps"), train.get("batch_size"), job.get("train_rows")
    if not steps:
        return f"{train.get('epochs')} epoch(s)"
    if batch and rows:  # as the loop counts epochs: steps over batches per epoch
        return f"{steps} steps ({steps / -(-rows // batch):.3g} epochs)"
    return f"{steps} steps"


def write_report(out_dir: Path, payload: dict) -> Path:
    """report.md and the same as one self-contained report.html, from results.json (and sweep.json when a
    comparison was tuned)."""
    records, job = payload["methods"], job_view(payload)
    entries = payload.get("summary") or summarize(records, job)  # older files have no summary
    studies = read_studies(out_dir)
    plots = write_figures(out_dir, records, job, entries, studies)
    cfg = next((r["config"] for r in records if r.get("config")), {})
    train = cfg.get("train", {})
    labels = f"; labels {', '.join(map(md_text, job['labels']))}" if job.get("labels") else ""
    model = " ".join(str(job.get("model_path")).split()).replace("`", "'")  # shown in a code span, as written
    lines = [
        "# tunelab comparison", "",
        f"Task `{job['task']}`, model `{model}`; {job.get('train_rows')} train / "
        f"{job.get('validation_rows')} validation ({job.get('validation_source')}) / {job.get('test_rows')} test "
        f"rows{labels}. Every method: {training_length(train, job)}, batch {train.get('batch_size')}, max length "
        f"{cfg.get('data', {}).get('max_length')}, {seeds_text(records, train)}.",
        "", *table(records, job), "", *baseline_lines(job),
        f"↑ higher is better, ↓ lower is better. Test numbers are for the checkpoint with the best validation "
        f"{job['metric_for_best']}; time and throughput count training steps only (evaluation excluded); peak "
        "memory is the process's resident set while the method trained.",
        "", *ranking(entries, job), "## Reading", "", *reading(records, job, entries), "", *task_lines(payload, job),
    ]
    if job.get("dropped_rows"):
        dropped = "; ".join(f"{md_text(k)}: {v}" for k, v in job["dropped_rows"].items())
        lines += [f"Rows left out of the data: {dropped}", ""]
    if job.get("notes"):
        lines += [*(f"Note on the data: {md_text(note)}." for note in job["notes"]), ""]
    if studies:
        lines += tuning_lines(studies)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    path = out_dir / "report.md"
    text = "\n".join(lines)
    path.write_text(text, encoding="utf-8")
    write_html(out_dir, text)
    return path


def read_studies(out_dir: Path) -> dict[str, dict]:
    import json

    path = out_dir / "sweep.json"
    return json.loads(path.read_text()).get("studies", {}) if path.is_file() else {}


def tuning_lines(studies: dict[str, dict]) -> list[str]:
    """What tuning found per method: trials, the chosen values, and which hyperparameters mattered."""
    lines = ["## Tuning (validation split only)", ""]
    for method, study in studies.items():
        done = sum(t["state"] == "COMPLETE" for t in study["trials"])
        pruned = sum(t["state"] == "PRUNED" for t in study["trials"])
        best = study.get("best")
        chosen = ", ".join(f"`{k}` = {v:.3g}" if isinstance(v, float) else f"`{k}` = {md_text(v)}"
                           for k, v in (best or {}).get("params", {}).items()) \
            or "none, no trial finished: it trained with the configured values"
        lines.append(f"- **{md_text(method)}**: {done} trials completed, {pruned} pruned; chosen: {chosen}.")
    return lines + [""]
