"""`tunelab recommend`: which methods fit a memory (and time) budget, ranked, each with its reasons.

Ranking: methods that fit first; among them, measured quality where the local results store has runs of the
same task on a model of similar size, else the seed's rules of thumb (plenty of data and memory: full
fine-tuning; a large model or tight memory: the LoRA family; little data: prompt tuning)."""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from ..config import ExperimentConfig
from ..errors import TunelabInputError
from ..train.loop import total_steps
from . import estimate, with_peak
from .processes import micro_batch_rows
from .store import similar_results

LARGE_MODEL = 1_000_000_000   # parameters: above this, adapters before full fine-tuning
LITTLE_DATA = 1_000           # training rows: below this, prompt methods first
PLENTY_OF_DATA = 10_000


SIZE_UNITS = {"tb": 2**20, "tib": 2**20, "t": 2**20, "gb": 2**10, "gib": 2**10, "g": 2**10, "mb": 1, "mib": 1,
              "m": 1, "kb": 2**-10, "kib": 2**-10, "k": 2**-10}
TIME_UNITS = {"days": 86400, "day": 86400, "d": 86400,
              "hours": 3600, "hour": 3600, "hrs": 3600, "hr": 3600, "h": 3600, "minutes": 60, "minute": 60,
              "mins": 60, "min": 60, "m": 60,
              "seconds": 1, "second": 1, "secs": 1, "sec": 1, "s": 1}


def parse_size_mb(text: str) -> float:
    """'24GB', '512MB', '1.5 GiB' → megabytes. A bare number is refused: '2' may mean 2 GB or 2 MB."""
    return _with_unit(text, SIZE_UNITS, "e.g. 24GB or 512MB")


def parse_duration_s(text: str) -> float:
    """'2h', '90m', '45min', '2hours', '1e3s', '1h30m' → seconds. A bare number is refused, as for sizes."""
    example = "e.g. 2h, 1h30m, 90min or 3600s"
    try:
        return _with_unit(text, TIME_UNITS, example)
    except ValueError as single:
        parts = re.findall(r"\d+(?:\.\d+)?\s*[a-z]+", text.strip().lower())  # 1h30m: a number and unit each
        if len(parts) < 2 or "".join(parts).replace(" ", "") != text.strip().lower().replace(" ", ""):
            raise single from None
    total = sum(_with_unit(part, TIME_UNITS, example, allow_zero=True) for part in parts)  # 1h0m is 1h
    if total <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return total


def _with_unit(text: str, units: dict[str, float], example: str, allow_zero: bool = False) -> float:
    value = text.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):  # 'min' before 'm', 'gib' before 'b'-less 'g'
        number = value[:-len(unit)]
        if value.endswith(unit) and number:
            try:
                result = float(number) * units[unit]
            except ValueError:
                break
            if result > 0 or allow_zero and result == 0:
                return result
            raise ValueError(f"{text!r} must be more than 0")
    raise ValueError(f"could not read {text!r}: a number and a unit ({', '.join(units)}), {example}")


def recommend(cfg: ExperimentConfig, memory_mb: float, time_budget_s: float | None = None,
              train_examples: int | None = None, peak_tflops: float | None = None) -> dict[str, Any]:
    from ..methods.base import registry

    # what the config check refuses for the configured methods applies to every candidate: under train.fsdp,
    # the methods that cannot train sharded, under train.gradient_checkpointing those that cannot checkpoint
    refused = {name: f"train.fsdp: cannot train sharded: {method.cannot_shard}"
                   for name, method in registry().items() if cfg.train.fsdp and method.cannot_shard}
    refused.update({name: f"train.gradient_checkpointing: cannot train with it: {method.cannot_checkpoint}"
                        for name, method in registry().items()
                        if cfg.train.gradient_checkpointing and method.cannot_checkpoint})
    estimated = all_methods_estimate(dataclasses.replace(cfg, methods=sorted(set(registry()) - set(refused))))
    candidates, skipped = estimated["methods"], {**estimated["not_applicable"], **refused}
    # the rows a run would train on, counted from local data by the estimate, unless the user says
    rows, rows_source = (train_examples, "--train-examples") if train_examples else \
        (estimated["train_rows"], estimated["train_rows_source"])
    if not candidates:
        raise TunelabInputError(["recommend: no method applies to this model"])
    device = with_peak(estimated["device"], peak_tflops)
    # train.max_steps wins over epochs, as in training
    steps = total_steps(cfg.train, rows) if rows or cfg.train.max_steps else None
    untimed = untimed_reason(steps, device, rows_source)
    if time_budget_s is not None and untimed:  # a budget that was given is checked or refused, never skipped
        raise TunelabInputError([f"--time-budget: the training time cannot be estimated, so the budget cannot "
                                 f"be checked: {untimed}; or leave --time-budget out to rank by memory alone"])
    total = candidates[0]["total_params"]
    # the rule of thumb asks whether full fine-tuning fits, the same answer for every method
    full = next((c for c in candidates if c["method"] == "full"), None)
    family_order, why = rule_of_thumb(rows, total, full is not None and full["peak_memory_mb"] <= memory_mb)
    plan = Plan(memory_mb, time_budget_s, steps, device["effective_flops"], cfg.train.gradient_checkpointing,
                rows, total, measured_quality(cfg.task, total, cfg.metric_for_best), family_order)
    ranked = sorted((judge(c, plan) for c in candidates), key=lambda r: r["rank_key"])
    for position, entry in enumerate(ranked, 1):
        entry["rank"] = position
        del entry["rank_key"]
    fits = [r for r in ranked if r["fits"]]
    return {"memory_mb": memory_mb, "time_budget_s": time_budget_s, "train_examples": rows,
            "train_examples_source": rows_source,
            "total_params": total, "rule_of_thumb": {"family_order": family_order, "reason": why},
            "methods": ranked, "not_applicable": skipped,
            "suggestions": [] if fits else suggestions(ranked, memory_mb, cfg, estimated["precision"],
                                                       estimated["device"].get("runtime_overhead_mb") or 0.0)}


def untimed_reason(steps: int | None, device: dict[str, Any], rows_source: str) -> str | None:
    """Why no training time can be estimated, naming what would give one; None where it can."""
    if not device["effective_flops"]:  # a GPU planned from a machine without one
        return ("the training device is not on this machine to measure: give its peak rate in the training "
                "precision with --peak-tflops (e.g. 989 for an H100 in bf16)")
    if not steps:
        return f"the epoch's rows are {rows_source}: give --train-examples N, or set train.max_steps"
    return None


_ESTIMATES: dict[str, dict[str, Any]] = {}


def all_methods_estimate(cfg: ExperimentConfig) -> dict[str, Any]:
    """The estimate of every method, kept for this process: ranking the same job against several budgets
    (16, 24, 80 GB), data sizes or lengths of training runs each method's fake step once (a few seconds each
    for a 7B model). How long the job trains is not part of it: an estimate is per step, recommend counts steps."""
    per_step = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=None, epochs=1.0))
    key = json.dumps(per_step.to_dict(), sort_keys=True, default=str)
    if key not in _ESTIMATES:
        _ESTIMATES[key] = estimate(per_step, skip_inapplicable=True)
    return _ESTIMATES[key]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every method is judged against: the budgets, the job's size and speed, and what was measured."""

    memory_mb: float
    budget_s: float | None
    steps: int | None
    flops_per_s: float | None  # the device's effective rate; None for one not measured
    checkpointing: bool        # train.gradient_checkpointing: every method's run recomputes
    rows: int | None
    total: int
    measured: dict[str, dict]
    family_order: list[str]  # the rule of thumb's, for methods ranked without a measured quality


def training_seconds(est: dict, plan: Plan, recomputes: bool) -> float | None:
    """Every step at the full length, at the device's effective rate; with checkpointing's recomputed
    forwards where the run checkpoints (configured, or needed to fit), counted once."""
    if not plan.steps or not plan.flops_per_s:
        return None
    flops = est["train_flops_per_step_checkpointing" if recomputes else "train_flops_per_step"]
    return flops * plan.steps / plan.flops_per_s


def duration(seconds: float) -> str:
    """Seconds under a minute (a short run is not '0.0 min'), else minutes."""
    return f"{seconds:.3g} s" if seconds < 60 else f"{seconds / 60:,.1f} min"


def judge(est: dict, plan: Plan) -> dict[str, Any]:
    from ..methods.base import get_method

    family = get_method(est["method"]).family
    peak, peak_ckpt = est["peak_memory_mb"], est["peak_memory_checkpointing_mb"]
    fits_plain, fits_ckpt = peak <= plan.memory_mb, peak_ckpt is not None and peak_ckpt <= plan.memory_mb
    needs_ckpt = fits_ckpt and not fits_plain
    recomputes = plan.checkpointing or needs_ckpt  # the run checkpoints: configured, or to fit
    train_s = training_seconds(est, plan, recomputes)
    # an unknown time never passes a budget (recommend refuses a budget it cannot check)
    in_time = plan.budget_s is None or (train_s is not None and train_s <= plan.budget_s)
    # no checkpointed number: the method cannot checkpoint, or its checkpointed step could not be estimated
    with_ckpt = f"{peak_ckpt:,.0f} MB with gradient checkpointing" if peak_ckpt is not None else \
        f"no estimate with gradient checkpointing: {est['checkpointing_note']}" if est.get("checkpointing_note") \
        else "no estimate with gradient checkpointing"
    reasons = [f"peak memory ≈ {peak:,.0f} MB ({with_ckpt}) against "
               f"{plan.memory_mb:,.0f} MB: " + ("fits" if fits_plain else "fits only with gradient checkpointing"
                                                if fits_ckpt else "does not fit")]
    if train_s is not None:
        reasons.append(time_reason(train_s, plan, recomputes, in_time))
    quality = plan.measured.get(est["method"])
    if quality:
        reasons.append(f"measured here on similar models by {quality['metric']} (the job's metric_for_best): "
                       f"{quality['mean']:.3f} in the latest; placed {quality['score']:.2f} between the worst (0) "
                       f"and the best (1) of the methods compared with it, over {quality['experiments']} stored "
                       "comparison(s)")
    prior = plan.family_order.index(family)
    in_memory = fits_plain or fits_ckpt
    fits = in_memory and in_time
    score = quality["score"] if quality else None
    return {"method": est["method"], "family": family, "fits": fits, "verdict": verdict(in_memory, in_time),
            "gradient_checkpointing": needs_ckpt, "peak_memory_mb": peak,
            "peak_memory_checkpointing_mb": peak_ckpt, "train_time_s": train_s,
            "trainable_params": est["trainable_params"], "reasons": reasons,
            "rank_key": rank_key(fits, score, prior, peak, peak_ckpt, in_memory, train_s)}


def verdict(in_memory: bool, in_time: bool) -> str:
    """What keeps a method out, in words: memory and time are different problems with different remedies."""
    return "fits" if in_memory and in_time else "over the time budget" if in_memory else \
        "does not fit in memory" if in_time else "does not fit in memory, and over the time budget"


def time_reason(train_s: float, plan: Plan, recomputes: bool, in_time: bool) -> str:
    """The time and, where a budget was given, the budget itself: 'over the time budget' alone says too little."""
    recomputing = ", recomputing for checkpointing" if recomputes else ""
    verdict = "" if plan.budget_s is None else \
        f": {'within' if in_time else 'over'} the time budget of {duration(plan.budget_s)}"
    return f"training ≈ {duration(train_s)} ({plan.steps:,} steps, every batch at full length{recomputing}){verdict}"


def rank_key(fits: bool, score: float | None, prior: int, peak: float, peak_ckpt: float | None,
             in_memory: bool = False, train_s: float | None = None) -> tuple:
    """Methods that fit first, by measured quality, then the rule of thumb. A method that cannot run has no
    use for its quality: those that fit in memory but take too long go by their time, the quickest first,
    then those that do not fit by the memory they would need, the closest first."""
    if fits:
        return (0, -(score if score is not None else -1.0), prior, peak)
    if in_memory:
        return (1, train_s if train_s is not None else float("inf"), prior)
    return (2, min(peak, peak_ckpt or peak), prior)


def rule_of_thumb(rows: int | None, total: int, full_fits: bool) -> tuple[list[str], str]:
    """(method families in order, why): the order methods rank in where no quality was measured; one answer
    for the whole job."""
    if rows is not None and rows < LITTLE_DATA:
        order, why = ["prompt", "adapter", "selective", "full"], f"little data ({rows} rows): prompt methods first"
    elif total >= LARGE_MODEL or not full_fits:
        order, why = ["adapter", "selective", "prompt", "full"], "large model or tight memory: the LoRA family first"
    elif rows is not None and rows >= PLENTY_OF_DATA:
        order, why = ["full", "adapter", "selective", "prompt"], "plenty of data and memory: full fine-tuning first"
    else:
        order, why = ["adapter", "full", "selective", "prompt"], "moderate data: adapters first, then full fine-tuning"
    return order, why


def measured_quality(task: str, total_params: int, metric: str) -> dict[str, dict]:
    """Per method, how it placed among the methods of the same stored comparisons in `metric` (the job's
    metric_for_best: an accuracy and a loss are not one scale): 1 the best there, 0 the worst, averaged over the
    comparisons it was in. Methods measured in different comparisons (other data, another model) were put on
    one scale before, so one comparison's easy data ranked its methods above another's; a comparison of one
    method says nothing of how it ranks."""
    by_experiment: dict[str, list[dict]] = {}
    for row in similar_results(task, total_params, metric):  # newest first
        if row["mean"] is not None:
            by_experiment.setdefault(row["experiment"], []).append(row)
    scores: dict[str, list[float]] = {}
    latest: dict[str, dict] = {}
    for rows in by_experiment.values():
        signed = {r["method"]: r["mean"] if r["higher_is_better"] else -r["mean"] for r in rows}
        if len(signed) < 2:
            continue
        low, high = min(signed.values()), max(signed.values())
        for method, value in signed.items():
            scores.setdefault(method, []).append((value - low) / (high - low) if high > low else 1.0)
        for row in rows:
            latest.setdefault(row["method"], row)
    return {method: {"metric": latest[method]["metric"], "mean": latest[method]["mean"],
                     "score": sum(values) / len(values), "experiments": len(values)}
            for method, values in scores.items()}


def suggestions(ranked: list[dict], memory_mb: float, cfg: ExperimentConfig, precision: str,
                runtime: float = 0.0) -> list[str]:
    """What would fit when nothing does: only changes to what the job does now (`precision` as resolved), and
    none where a training process (`runtime` MB before its first tensor) is larger than the budget."""
    if any(r["verdict"] == "over the time budget" for r in ranked):  # memory is not what keeps them out
        return time_ideas(ranked, cfg)
    lightest = min(ranked, key=lambda r: r["peak_memory_mb"])
    checkpointed = [r for r in ranked if r["peak_memory_checkpointing_mb"] is not None]
    ideas = [f"the lightest method, {lightest['method']}, needs ≈ {lightest['peak_memory_mb']:,.0f} MB against "
             f"{memory_mb:,.0f} MB"]
    if runtime >= memory_mb:  # no change to the job helps: the process is that large before its first tensor
        return ideas + [f"a training process here takes ≈ {runtime:,.0f} MB before any tensor (the libraries it "
                        f"imports), more than {memory_mb:,.0f} MB: no setting of the job fits; this needs more "
                        "memory"]
    if checkpointed:
        least = min(checkpointed, key=lambda r: r["peak_memory_checkpointing_mb"])
        switch = "" if cfg.train.gradient_checkpointing else " (train.gradient_checkpointing=true)"
        ideas.append(f"with gradient checkpointing{switch} {least['method']} needs "
                     f"≈ {least['peak_memory_checkpointing_mb']:,.0f} MB")
    ideas += accumulation_idea(cfg)
    if precision != "bf16":
        ideas.append("bf16 (train.precision=bf16 where the device runs it fast) halves activations and frozen weights")
    rank = cfg.options("lora").r
    if "lora" in {r["method"] for r in ranked}:  # (not where LoRA does not apply: no targets in this model)
        ideas.append(f"a lower LoRA rank (lora.r={rank // 2}) or fewer target modules trims an adapter's share"
                     if rank > 1 else "fewer LoRA target modules trim an adapter's share")
    ideas.append("several devices can share the weights, gradients and optimizer state: train.fsdp=true with "
                 "--nproc N or torchrun; `tunelab estimate --nproc N train.fsdp=true` gives one device's share")
    return ideas


def time_ideas(ranked: list[dict], cfg: ExperimentConfig) -> list[str]:
    """Methods fit in memory but not in the time: ways to train less, not to hold less (gradient checkpointing
    and accumulation, the memory remedies, only make a run slower)."""
    quickest = min((r for r in ranked if r["verdict"] == "over the time budget"),
                   key=lambda r: r["train_time_s"] if r["train_time_s"] is not None else float("inf"))
    ideas = [f"the quickest method that fits in memory, {quickest['method']}, needs ≈ "
             f"{duration(quickest['train_time_s'])}" if quickest["train_time_s"] is not None else
             f"{quickest['method']} fits in memory; its time is not known"]
    ideas.append(f"fewer steps: train.epochs below {cfg.train.epochs:g}, train.max_steps, or fewer rows "
                 "(data.max_train_samples)")
    ideas.append(f"a shorter data.max_length than {cfg.data.max_length} where the rows allow it (each step is "
                 "timed at full length)")
    if cfg.train.gradient_checkpointing:
        ideas.append("train.gradient_checkpointing=false, where memory allows: it recomputes every forward")
    ideas.append("more devices: --nproc N or torchrun split every step's rows")
    return ideas


def accumulation_idea(cfg: ExperimentConfig) -> list[str]:
    """More accumulation steps, where the rows of one forward can still be split."""
    batch, more = cfg.train.batch_size, min(cfg.train.batch_size, cfg.train.gradient_accumulation_steps * 4)
    split = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_accumulation_steps=more))
    rows_now, rows_then = micro_batch_rows(cfg, 1), micro_batch_rows(split, 1)
    if rows_then >= rows_now:  # one row per forward already
        return []
    return [f"a smaller batch per forward shrinks activations: train.gradient_accumulation_steps={more} keeps "
            f"the global batch of {batch} and runs it in {more} parts, {rows_then} row(s) each instead of {rows_now}"]
