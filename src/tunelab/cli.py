"""Command line: `tunelab compare`, `validate`, `sweep`, `predict`, `export`, `ls methods|tasks`, `report`."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from pathlib import Path

from .errors import CompareInterrupted, TunelabInputError

EPILOG = "Overrides are key=value with dotted keys, e.g. methods=full,lora train.lr=3e-5 lora.r=16"
PEAK_HELP = ("the training device's peak TFLOP/s in the training precision (e.g. 989 for an H100's dense bf16): "
             "times from it instead of this machine's measured rate; with train.device=cuda on a machine "
             "without a GPU, the only way to get times")
ROWS_HELP = "training rows per epoch (default: counted in local data, else data.max_train_samples)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Compare fine-tuning methods fairly.")
    sub = parser.add_subparsers(dest="command", required=True)
    hub = argparse.ArgumentParser(add_help=False)
    hub.add_argument("--offline", action="store_true",
                     help="never contact the Hugging Face Hub: cached models and datasets only (= HF_HUB_OFFLINE=1)")
    for name, text in (("compare", "train, evaluate and compare methods"),
                       ("validate", "check config, model and data without training")):
        cmd = sub.add_parser(name, help=text, epilog=EPILOG, parents=[hub])
        cmd.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
        if name == "validate":
            cmd.add_argument("--nproc", "--processes", type=int, default=1, metavar="N",
                             help="check for a run of N data-parallel processes (as compare --nproc N)")
            cmd.add_argument("--seeds", type=int, default=1, metavar="K", help="check for compare --seeds K")
            cmd.add_argument("--tune", type=int, default=0, metavar="N",
                             help="check for compare --tune N (sweep.space as a sweep searches it)")
        if name == "compare":
            cmd.add_argument("--output", "-o", help="experiment folder (default: runs/compare-<time>)")
            cmd.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")
            cmd.add_argument("--no-progress", action="store_true", help="no progress bars")
            cmd.add_argument("--resume", action="store_true",
                             help="continue the experiment in --output: finished methods are kept, "
                                  "unfinished ones continue from their latest checkpoint")
            cmd.add_argument("--allow-config-change", action="store_true",
                             help="with --resume: accept a config that differs from the saved one")
            cmd.add_argument("--seeds", type=int, default=None, metavar="K",
                             help="train every method with K seeds (train.seed, +1, ...): intervals and "
                                  "paired tests over seeds")
            cmd.add_argument("--tune", type=int, default=None, metavar="N",
                             help="first give every method N optuna trials on the validation split, then train "
                                  "its best configuration (with --seeds K seeds)")
            cmd.add_argument("--nproc", "--processes", type=int, metavar="N",
                             help="train each run as N data-parallel processes on this machine (DDP, same global "
                                  "batch); under torchrun/accelerate launch: the process count to expect")
            cmd.add_argument("--in-process", action="store_true",
                             help="debugging: run every method in this process (memory then depends on order)")
    sweep = sub.add_parser("sweep", help="tune each method's hyperparameters with optuna", epilog=EPILOG,
                           parents=[hub])
    sweep.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    sweep.add_argument("--output", "-o", help="experiment folder (default: runs/sweep-<time>)")
    sweep.add_argument("--trials", type=int, help="trials per method: the study's total over all workers (default "
                       "20; on --resume as started)")
    sweep.add_argument("--storage", help="optuna storage URL shared by workers (default: a SQLite file in --output)")
    sweep.add_argument("--study-name", help="study name prefix (default: derived from the config)")
    sweep.add_argument("--resume", action="store_true", help="continue a killed sweep in --output")
    sweep.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.add_argument("--nproc", "--processes", type=int, metavar="N",
                       help="train each trial as N DDP processes (default 1; on --resume: as started)")
    add_use_commands(sub, hub)
    estimate = sub.add_parser("estimate", help="parameters, peak memory, FLOPs and time per method, from the "
                              "model's config alone", epilog=EPILOG, parents=[hub])
    estimate.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    estimate.add_argument("--json", action="store_true", help="one JSON object with a `methods` list")
    estimate.add_argument("--train-examples", type=positive(int), help=ROWS_HELP)
    estimate.add_argument("--peak-tflops", type=positive(float), help=PEAK_HELP)
    estimate.add_argument("--nproc", "--processes", type=int, default=1, metavar="N",
                          help="memory of one of N processes (DDP; its shards under train.fsdp)")
    recommend = sub.add_parser("recommend", help="rank the methods that fit a memory (and time) budget, with "
                               "reasons", epilog=EPILOG, parents=[hub])
    recommend.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    recommend.add_argument("--memory", required=True, help="memory budget, e.g. 24GB, 512MB")
    recommend.add_argument("--time-budget", help="training time budget, e.g. 2h, 90m")
    recommend.add_argument("--train-examples", type=positive(int), help=ROWS_HELP)
    recommend.add_argument("--peak-tflops", type=positive(float), help=PEAK_HELP)
    recommend.add_argument("--json", action="store_true", help="one JSON object")
    ls = sub.add_parser("ls", help="list registered things")
    ls.add_argument("what", choices=["methods", "tasks"])
    report = sub.add_parser("report", help="rebuild report.md from an experiment's results.json "
                            "(a sweep folder: sweep.md from its sweep.json)")
    report.add_argument("folder")
    return parser


def add_use_commands(sub, hub: argparse.ArgumentParser) -> None:
    where = "an experiment folder (default method: the best one) or one artifact folder"
    predict = sub.add_parser("predict", help="predict with a saved artifact, one JSON line per input",
                             parents=[hub])
    predict.add_argument("path", metavar="EXPERIMENT_DIR|ARTIFACT_DIR", help=where)
    predict.add_argument("overrides", nargs="*", default=[], metavar="TASK.KEY=VALUE",  # (a default: optional)
                         help="change a task option for prediction, e.g. causal-lm.max_new_tokens=128")
    predict.add_argument("--method", help="the method whose artifact to use (default: the experiment's best)")
    predict.add_argument("--text", action="append", default=[], help="an input (repeatable)")
    predict.add_argument("--input", help="a file of inputs: .jsonl, a .json array, .csv/.tsv, .parquet, or plain "
                                         "text (one per line)")
    predict.add_argument("--output", "-o", help="write JSON lines here instead of standard output")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    predict.add_argument("--precision", choices=["fp32", "bf16"],
                         help="default: the precision the run trained in (fp32: the numbers an fp32 load of "
                              "`export --merge` gives)")
    export = sub.add_parser("export", help="copy an artifact, or merge it into a plain transformers model",
                            parents=[hub])
    export.add_argument("path", metavar="EXPERIMENT_DIR|ARTIFACT_DIR", help=where)
    export.add_argument("--method", help="the method to export (default: the experiment's best)")
    export.add_argument("--merge", action="store_true",
                        help="fold the adapter into the base weights (LoRA family, IA3; not virtual-token methods)")
    export.add_argument("--output", "-o", required=True, help="folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item is the config file unless it looks like an override."""
    if items and not looks_like_override(items[0]):
        return items[0], items[1:]
    return None, items


def looks_like_override(item: str) -> bool:
    """key=value with a dotted key; a path may hold an = too (Hydra-style folders: outputs/lr=3e-5/config.yaml)."""
    key, equals, _ = item.partition("=")
    return bool(equals) and re.fullmatch(r"[\w.\-]+", key) is not None and not Path(item).is_file()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (`--memory 24GB lora.r=4`): argparse stops at the option
    trailing = "items" if hasattr(args, "items") else "overrides"
    if extra and hasattr(args, trailing) and all("=" in item and not item.startswith("-") for item in extra):
        setattr(args, trailing, getattr(args, trailing) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "offline", False):
        # before transformers/datasets are imported: they read these once, at import
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        with sigterm_as_ctrl_c():
            return dispatch(args)
    except TunelabInputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CompareInterrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `tunelab validate | head`: the reader left; end as a SIGPIPE'd tool does, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush would raise again)
        return 141


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (`kill`, a scheduler) stops a command as Ctrl-C does (exit 130, results so far kept), not with
    Python's default death by the signal; while a run trains, its own handling takes over (a checkpoint first)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "ls":
        from .api_plan import ls

        for name, item in ls(args.what).items():
            print(f"{name:<16}{item['description']}")
            if item.get("data_keys"):
                print(f"{'':<16}reads {', '.join(item['data_keys'])}")
        return 0
    if args.command == "report":
        from .api_plan import report

        print(report(args.folder))
        return 0
    if args.command in ("predict", "export"):
        return run_use_command(args)
    config, overrides = split_items(args.items)
    if args.command == "estimate":
        return run_estimate(args, config, overrides)
    if args.command == "recommend":
        return run_recommend(args, config, overrides)
    if args.command == "sweep":
        return run_sweep(args, config, overrides)
    if args.command == "validate":
        from .api import validate

        job = validate(config, overrides, args.nproc, args.seeds, args.tune)
        print("config, model and data are valid:")
        for key, value in job.summary().items():
            print(f"  {key}: {value}")
        if not args.tune:
            from .sweep.space import space_problems

            for problem in space_problems(job.config):  # only a search refuses them: said, not refused
                print(f"note: `tunelab sweep` and `compare --tune` would refuse: {problem}", file=sys.stderr)
        return 0
    from .api import compare
    from .report import table
    from .report.view import job_view, plain_text

    outcome = compare(config, overrides, args.output, args.overwrite, show_progress=not args.no_progress,
                      resume=args.resume, allow_config_change=args.allow_config_change, seeds=args.seeds,
                      isolate=not args.in_process, tune=args.tune, nproc=args.nproc)
    if not outcome.records:  # a process other than the main one of a torchrun/accelerate launch
        return 0
    view = job_view({"job": outcome.job, "methods": outcome.records})
    print("\n".join(table(outcome.records, view, text=plain_text)))
    from .models.loading import first_line

    for record in outcome.records:  # the table says "failed"; why is in results.json, and here, in short
        if record.get("error") and record["status"] != "success":
            print(f"{record.get('run_id', record['method'])} {record['status']}: {first_line(record['error'])}",
                  file=sys.stderr)
    print(f"\nresults: {outcome.output_dir / 'results.json'}\nreport:  {outcome.report_path}")
    return outcome.exit_code


def run_estimate(args: argparse.Namespace, config, overrides) -> int:
    import json

    from .api_plan import estimate

    result = estimate(config, overrides, args.train_examples, args.peak_tflops, args.nproc)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_estimate(result)
    return 0


def print_estimate(result: dict) -> None:
    device = result["device"]
    print(f"{result['model']} ({result['task']}), batch {result['batch_size']} × {result['seq_len']} tokens, "
          f"{result['precision']} on {device['name']}")
    if device.get("allocator_note"):
        print(f"note: allocator {device['allocator_note']}")
    if result.get("precision_note"):
        print(f"note: {result['precision_note']}")
    if result["processes"] > 1 or result["micro_batch_rows"] < result["batch_size"]:
        print(f"memory of one of {result['processes']} processes{' (FSDP shards)' if result['fsdp'] else ''}, "
              f"{result['micro_batch_rows']} rows at a time")
    rows = (f"{result['train_rows']:,} train rows an epoch, {result['train_rows_source']}" if result.get("train_rows")
            else "epoch: rows unknown; --train-examples gives them")
    print(f"\nparameters and time (every batch at the full length; {rows})")
    methods = [{**m, "train_tflops_per_step": float(f"{m['train_flops_per_step'] / 1e12:.3g}")
                if m.get("train_flops_per_step") is not None else None} for m in result["methods"]]
    print_table(methods, {"total_params": "total", "trainable_params": "trainable",
                          "added_params": "added", "train_tflops_per_step": "TFLOP/step",
                          "step_time_s": "step s", "epoch_time_s": "epoch s"})
    memory = {"weights_mb": "weights", "gradients_mb": "grads", "optimizer_mb": "optimizer",
              "activations_mb": "activations", "allocator_kept_mb": "kept", "runtime_overhead_mb": "runtime",
              "collective_buffers_mb": "collectives", "peak_memory_mb": "peak",
              "peak_memory_checkpointing_mb": "peak (ckpt)"}
    if result["processes"] == 1:
        del memory["collective_buffers_mb"]
    print("\nmemory in MB (peak (ckpt): with gradient checkpointing)")
    print_table(result["methods"], memory)
    for m in result["methods"]:  # why a cell is empty, or where a number came from other than one fake step
        if m.get("checkpointing_note"):
            print(f"  {m['method']}, peak (ckpt): {m['checkpointing_note']}")
        if str(m.get("memory_from", "")).startswith("formula"):  # the fake step failed
            print(f"  {m['method']}: memory from {m['memory_from']}")


def print_table(methods: list[dict], columns: dict[str, str]) -> None:
    # a space before each column: a 7B model's 6,738,415,616 parameters fill 13 characters
    print(f"{'method':<15}" + "".join(f" {label:>13}" for label in columns.values()))
    for m in methods:
        print(f"{m['method']:<15}" + "".join(f" {cell(m.get(c)):>13}" for c in columns))


def cell(value) -> str:
    """A count with its thousands marked; a measured quantity (seconds, MB) to four digits, not 4,995.4035."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


KIND_NAMES = {int: "whole number", float: "number"}


def positive(kind):
    """An argparse type: a finite number above zero (0 or NaN would silently mean 'not given' or give NaN times)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {KIND_NAMES.get(kind, kind.__name__)}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; must be a number above 0")
        return value
    return parse


def run_recommend(args: argparse.Namespace, config, overrides) -> int:
    import json

    from .api_plan import recommend

    result = recommend(config, overrides, args.memory, args.time_budget, args.train_examples, args.peak_tflops)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["train_examples"]:
        print(f"{result['train_examples']:,} train rows an epoch ({result['train_examples_source']})")
    rule = result["rule_of_thumb"]
    print(f"rule of thumb, for methods without a measured quality: {rule['reason']} "
          f"({' > '.join(rule['family_order'])})")
    for entry in result["methods"]:
        print(f"{entry['rank']:>2}. {entry['method']:<14} {entry['verdict']}")
        for reason in entry["reasons"]:
            print(f"      - {reason}")
    for name, why in result["not_applicable"].items():
        print(f"    {name:<14} not applicable: {why}")
    if result["suggestions"]:
        print("nothing fits; what would help:\n" + "\n".join(f"  - {s}" for s in result["suggestions"]))
    return 0


def run_use_command(args: argparse.Namespace) -> int:
    if args.command == "export":
        from .use.artifact import find_artifact, read_artifact
        from .use.export import export

        note = find_artifact(args.path, args.method).note  # the best so far of an unfinished experiment
        out = export(args.path, args.output, args.method, args.merge, args.overwrite)
        merged = read_artifact(out).manifest.get("merged_from")
        whole = " (a whole model already: copied, nothing to merge)" if args.merge and not merged else ""
        if note:
            print(f"note: {note}", file=sys.stderr)
        print(f"exported {'merged model' if merged else 'artifact'}{whole}: {out}", file=sys.stderr)
        return 0
    from .use.predict import predict, write_predictions

    artifact, outputs = predict(args.path, args.text, args.input, args.method, args.batch_size, args.device,
                                args.precision, args.overrides)
    write_predictions(outputs, args.output)
    if artifact.note:
        print(f"note: {artifact.note}", file=sys.stderr)
    print(f"{len(outputs)} predictions with {artifact.method} ({artifact.directory})", file=sys.stderr)
    return 0


def run_sweep(args: argparse.Namespace, config, overrides) -> int:
    from .api import sweep

    from .sweep.study import SweepFailed

    try:
        outcome = sweep(config, overrides, args.output, args.trials, args.storage, args.study_name, args.resume,
                        args.overwrite, show_progress=not args.no_progress, nproc=args.nproc)
    except SweepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for method, study in outcome.studies.items():
        best = study["best"]
        shown = f"{best['value']:.4f} with {best['params']}" if best else "no completed trial"
        print(f"{method:<16}best {shown}")
    print(f"\nsweep: {outcome.output_dir / 'sweep.json'}\nreport: {outcome.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
