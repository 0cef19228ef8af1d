"""One (method, system) training run of benchmarks/vs_trainer.py, in a process of its own.

Run as `python benchmarks/_children.py '<json spec>'`; the last stdout line is `RESULT {json}`.
A fresh process per run makes ru_maxrss (peak RSS) belong to that run alone and keeps one run's
allocator state, thread pools and accelerate singletons from leaking into the next.

Every system loads the same tunelab Job (same train/validation rows, same tokenizer, same labels) and is
scored by the same function (the job's task evaluate on job.validation), so the three differ only
in how they train. Only the N optimizer steps are timed; loading, tokenizing and evaluation are not.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time

import torch
from tunelab.train.tracking import MemoryMonitor, current_rss_mb  # RSS sampled every 20 ms by a thread


def sync(device: str) -> None:
    # CUDA runs asynchronously: without this a timestamp would miss queued work.
    if device == "cuda":
        torch.cuda.synchronize()


def load_job(spec: dict):
    """tunelab's job with the benchmark's sizes; evaluation only at the end, no early stopping."""
    import tunelab

    overrides = [
        f"methods={spec['method']}", f"data.max_length={spec['max_length']}",
        f"data.max_train_samples={spec['train_samples']}", f"data.max_eval_samples={spec['eval_samples']}",
        f"train.batch_size={spec['batch_size']}", f"train.seed={spec['seed']}",
        f"train.max_steps={spec['steps']}", f"train.device={spec['device']}",
        "train.eval_every_steps=0", "train.early_stopping_patience=0",
        "train.weight_decay=0.01", "train.warmup_ratio=0.06", "train.max_grad_norm=1.0",
    ]
    if spec["threads"]:
        overrides.append(f"train.threads={spec['threads']}")
    if spec["system"] == "tunelab-compiled":  # CUDA graphs where there are launches to save
        overrides.append(f"train.compile={'reduce-overhead' if spec['device'] == 'cuda' else 'default'}")
    return tunelab.validate(None, overrides + spec.get("overrides", []))  # --override wins


def method_lr(job, method: str) -> float:
    from tunelab.methods.base import get_method

    return get_method(method).resolve_lr(job.config.options(method), job.config.train.lr)


def warmup_steps(job) -> int:
    # the same integer tunelab's build_scheduler uses (ceil of ratio * steps, as Trainer rounds a ratio)
    return math.ceil(job.config.train.warmup_ratio * job.config.train.max_steps)


# ---------------------------------------------------------------- tunelab

def run_tunelab(job, spec: dict) -> dict:
    from tunelab.experiment.runner import setup_method
    from tunelab.train.loop import TrainingLoop, Validation

    class PeakAtFirstEval(TrainingLoop):
        """tunelab's loop, unchanged, except that it notes the memory peak when training first pauses."""
        last_metrics, train_peak_mb = None, None

        def evaluate(self, state):
            if self.train_peak_mb is None:
                self.train_peak_mb = max(memory.peak_mb, current_rss_mb())
            self.last_metrics = super().evaluate(state)
            return self.last_metrics

    setup = setup_method(job, spec["method"])
    # scored as tunelab's runner scores it: the task's evaluate on validation, under the run's autocast
    eval_setup = job.eval_setup(setup.accelerator.device, setup.accelerator.autocast)
    metric = job.config.metric_for_best
    validation = Validation(lambda model: job.task.evaluate(model, job.validation, eval_setup).metrics,
                            metric, job.task.higher_is_better(metric))
    loop = PeakAtFirstEval(setup.model, setup.optimizer, setup.scheduler, setup.accelerator, job.config.train,
                           job.train, validation)
    loop.hooks.after_step = steady = SteadyClock(spec)
    rss_before = current_rss_mb()
    with MemoryMonitor(torch.device(spec["device"])) as memory:
        state = loop.run()  # evaluates after the last step (eval_every_steps=0) and at each epoch end
    # The loop's own clock: training steps only (evaluation left out), synchronised on CUDA.
    train_s = state.train_time_s
    precision = "bf16" if setup.accelerator.mixed_precision == "bf16" else "fp32"
    return {"train_s": train_s, "steps_done": state.step, "samples": state.samples_seen,
            "tokens": state.tokens_seen, "val": loop.last_metrics, "lr": setup.lr,
            "train_loss_mean": sum(state.losses) / max(len(state.losses), 1), "rss_before_train_mb": rss_before,
            "train_peak_rss_mb": loop.train_peak_mb, "steady_step_s": steady.seconds_per_step(),
            "flags": {"precision": precision, "sampler": f"tunelab buckets of {job.config.train.bucket_size}",
                      "padding": "longest in batch, to a multiple of 8"}}


class SteadyClock:
    """Seconds per step after the first fifth of the steps, where compiling (train.compile) and first-touch
    allocation are done: what a long run pays per step. One device sync at each end of that span only."""

    def __init__(self, spec: dict):
        self.device, self.last = spec["device"], spec["steps"]
        self.first = max(1, self.last // 5)
        self.started = self.ended = None

    def __call__(self, step: int) -> None:
        if step in (self.first, self.last):
            sync(self.device)
            if step == self.first:
                self.started = time.perf_counter()
            if step == self.last:
                self.ended = time.perf_counter()

    def seconds_per_step(self) -> float | None:
        if self.started is None or self.ended is None or self.last == self.first:
            return None
        return (self.ended - self.started) / (self.last - self.first)


# ---------------------------------------------------------------- transformers Trainer (B1, B2)

def b2_bf16(device: str) -> bool:
    """bf16 only where it is fast: on CPUs without AMX/AVX512-BF16 it is emulated and far slower than fp32."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    from tunelab.train.setup import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def load_model(job, method: str):
    """The packaged model wrapped the way tunelab's methods do it, written as a plain user would."""
    from transformers import AutoModelForSequenceClassification
    from tunelab.train.setup import seed_everything

    seed_everything(job.config.train.seed)  # tunelab seeds right before loading too: same head init
    model = AutoModelForSequenceClassification.from_pretrained(
        job.model_path, num_labels=len(job.label_names), local_files_only=True,
        id2label=dict(enumerate(job.label_names)), label2id={n: i for i, n in enumerate(job.label_names)})
    opts = job.config.options(method)
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model
        from tunelab.methods.base import get_method

        targets = ["query", "value"]
        assert get_method("lora").targets(model, opts, ("classifier",)) == targets, "tunelab's LoRA targets changed"
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=opts.r, lora_alpha=opts.alpha,
                            lora_dropout=opts.dropout, target_modules=targets)
        return get_peft_model(model, config)
    if method == "prompt-tuning":
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        config = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=opts.num_virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit.TEXT,
                                    # tunelab's text: the option, else the task's from the label names
                                    prompt_tuning_init_text=opts.init_text or job.task.prompt_init_text(job.data.info),
                                    tokenizer_name_or_path=job.model_path)
        return get_peft_model(model, config)
    return model  # full and llrd train every parameter


def llrd_optimizers(model, job):
    """Trainer cannot express per-layer rates: pass AdamW over tunelab's own LLRD groups, plus its schedule."""
    from transformers import get_linear_schedule_with_warmup
    from tunelab.methods.base import get_method

    lr = method_lr(job, "llrd")
    groups = get_method("llrd").param_groups(model, job.config.options("llrd"), lr, job.config.train.weight_decay)
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    # fused like Trainer's own default optimizer (adamw_torch_fused), so llrd differs from full only in groups
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup_steps(job), job.config.train.max_steps)
    return optimizer, schedule


def train_dataset(job):
    """The job's train rows, tokenized the plain way: truncation only, padding left to the collator."""
    import datasets
    from tunelab.tasks.classification import text_column

    datasets.disable_progress_bars()
    texts = job.data.frames["train"][text_column(job.config)].astype(str).tolist()  # the rows behind job.train
    raw = datasets.Dataset.from_dict({"text": texts, "label": job.train.labels.tolist()})
    tokenize = lambda rows: job.tokenizer(rows["text"], truncation=True, max_length=job.config.data.max_length)
    return raw.map(tokenize, batched=True, remove_columns=["text"])


class CountingCollator:
    """DataCollatorWithPadding plus a tally of real (attention-mask) tokens; a sum over a small CPU tensor."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        self.batches.append((len(batch["input_ids"]), int(batch["attention_mask"].sum())))
        return batch


def step_clock(device: str):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time from the first step's start to the last step's end, as tunelab's loop is timed."""
        started = ended = None

        def on_train_begin(self, args, state, control, **kwargs):
            sync(device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                sync(device)
                self.ended = time.perf_counter()

    return StepClock()


def trainer_args(job, spec: dict, out_dir: str, bf16: bool):
    from transformers import TrainingArguments

    best = spec["system"] == "B2"
    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=method_lr(job, spec["method"]), weight_decay=0.01, warmup_steps=warmup_steps(job),
        lr_scheduler_type="linear", max_grad_norm=1.0, seed=spec["seed"],
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=spec["device"] == "cpu", bf16=bf16,
        **sampling_flag(best))


def sampling_flag(group_by_length: bool) -> dict:
    """transformers 5.2x replaced group_by_length=True with train_sampling_strategy; older ones (such as
    the 5.17 on the GPU machine) have only the former."""
    from transformers import TrainingArguments

    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


def run_trainer(job, spec: dict) -> dict:
    from transformers import DataCollatorWithPadding, Trainer

    bf16 = spec["system"] == "B1-bf16" or (spec["system"] == "B2" and b2_bf16(spec["device"]))
    model = load_model(job, spec["method"])
    data = train_dataset(job)
    # B2's best flags include padding to a multiple of 8, as tunelab pads (a one-argument option: ~4 % a step)
    padding = {"pad_to_multiple_of": 8} if spec["system"] == "B2" else {}
    collator = CountingCollator(DataCollatorWithPadding(job.tokenizer, **padding))
    clock = step_clock(spec["device"])
    optimizers = llrd_optimizers(model, job) if spec["method"] == "llrd" else (None, None)
    with tempfile.TemporaryDirectory() as out_dir:
        args = trainer_args(job, spec, out_dir, bf16)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                          processing_class=job.tokenizer, optimizers=optimizers, callbacks=[clock])
        warm_up(trainer.model, collator.inner([data[i] for i in range(args.per_device_train_batch_size)]),
                spec["device"], bf16)
        rss_before = current_rss_mb()
        with MemoryMonitor(torch.device(spec["device"])) as memory:
            output = trainer.train()
    done = trainer.state.global_step
    seen = collator.batches[:done]  # ignore any batch fetched but not trained on
    autocast = (lambda: torch.autocast(spec["device"], dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return {"train_s": clock.ended - clock.started, "steps_done": done, "samples": sum(n for n, _ in seen),
            "tokens": sum(t for _, t in seen), "val": evaluate(trainer.model, job, spec, autocast),
            "lr": args.learning_rate, "train_loss_mean": output.training_loss, "rss_before_train_mb": rss_before,
            "train_peak_rss_mb": memory.peak_mb,
            "flags": {"precision": "bf16" if bf16 else "fp32",
                      "sampler": "group_by_length" if spec["system"] == "B2" else "random",  # see trainer_args
                      "padding": "DataCollatorWithPadding (longest in batch"
                                 + (", to a multiple of 8)" if padding else ")")}}


def warm_up(model, batch: dict, device: str, bf16: bool) -> None:
    """One untimed forward+backward before Trainer's clock starts, as tunelab's set-up runs a few before its own
    (the precision probe where bf16 is native, the head-row check): kernels chosen and loaded, first-touch
    allocation done, on both sides. Gradients and random state are left as they were."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device == "cuda" else None
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    model.train()
    with autocast:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    sync(device)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)


def evaluate(model, job, spec: dict, autocast) -> dict:
    device = torch.device(spec["device"])
    return job.task.evaluate(model, job.validation, job.eval_setup(device, autocast)).metrics


# ---------------------------------------------------------------- entry point

def main(spec: dict) -> None:
    from tunelab.methods.base import get_method
    from tunelab.models.loading import quiet_transformers

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    quiet_transformers()
    job = load_job(spec)
    run = run_tunelab if spec["system"].startswith("tunelab") else run_trainer
    result = run(job, spec)
    method = spec["method"]
    result.update(method=method, system=spec["system"], threads=torch.get_num_threads(),
                  # prompt tuning runs its virtual tokens through every layer too: they count as compute
                  virtual_tokens_per_sample=get_method(method).extra_positions(job.config.options(method)),
                  train_rows=len(job.train), val_rows=len(job.validation),
                  mean_train_tokens=float(job.train.lengths.mean()),
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    if spec["device"] == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if os.environ.get("RANK", "0") == "0":  # tunelab-2p: the main process reports
        print("RESULT " + json.dumps(result, default=float), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
