"""Finding and loading what a comparison saved: an experiment folder (the best method, or --method) or one
artifact folder (its `tunelab.json` says the method, task, base model and labels)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..errors import TunelabInputError
from ..experiment.results import read_results

MANIFEST = "tunelab.json"


@dataclass
class Artifact:
    directory: Path
    manifest: dict[str, Any]
    note: str = ""  # why this one was chosen, where the user should know (the best of an unfinished experiment)

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def task(self):
        from ..tasks.base import registry

        return registry()[self.manifest.get("task", "classification")]

    @property
    def info(self) -> dict[str, Any]:
        return {"labels": self.manifest.get("labels"), "columns": self.manifest.get("columns") or {}}

    def method_options(self):
        """The method's options as the run had them."""
        from ..config.schema import build
        from ..methods.base import get_method

        return build(get_method(self.method).Options, self.manifest.get("options") or {}, self.method, [])

    def task_options(self, overrides: Sequence[str] = ()):
        """The task's options as the run had them, with `overrides` (`causal-lm.max_new_tokens=128`) applied."""
        from ..config import apply_override
        from ..config.schema import build

        raw, problems = {self.task.name: dict(self.manifest.get("task_options") or {})}, []
        for item in overrides:
            if item.partition("=")[0].strip().split(".")[0] != self.task.name:
                problems.append(f"override {item!r}: predict takes the task's options only, as "
                                f"{self.task.name}.KEY=VALUE")
            else:
                apply_override(raw, item, problems)
        options = build(self.task.Options, raw[self.task.name], self.task.name, problems)
        if problems:
            raise TunelabInputError(problems)
        return options


def find_artifact(path: str | Path, method: str | None = None) -> Artifact:
    """The artifact in `path`: the folder itself, or an experiment's artifact of `method` (default: the best)."""
    folder = Path(path).expanduser()
    if (folder / MANIFEST).is_file():
        artifact = read_artifact(folder)
        if method and method != artifact.method:
            raise TunelabInputError([f"--method: {str(folder)!r} holds the {artifact.method!r} artifact, "
                                     f"not {method!r}"])
        return artifact
    if not (folder / "results.json").is_file() and (folder / "sweep.json").is_file():
        return of_method(sweep_best_trial(folder, method), method)
    if not (folder / "results.json").is_file():
        started = (folder / "run.json").is_file()  # an experiment whose first run has not finished yet
        raise TunelabInputError([f"{str(folder)!r} has no finished run yet (results.json appears when the first "
                                 "one ends)" if started else f"{str(folder)!r} is neither an experiment folder (no "
                                 f"results.json) nor an artifact folder (no {MANIFEST})"])
    payload = read_results(folder)
    chosen = method
    method = method or best_method(payload, folder)
    runs = [r for r in payload.get("methods", []) if r["method"] == method and r.get("status") == "success"
            and (folder / "artifacts" / r.get("run_id", method) / MANIFEST).is_file()]
    if not runs:
        finished = sorted({r["method"] for r in payload.get("methods", []) if r.get("status") == "success"})
        raise TunelabInputError([f"--method: {str(folder)!r} has no saved artifact of {method!r}"
                                 f"{runs_of_text(payload, method)}; methods with one: {', '.join(finished) or 'none'}"
                                 f"{unfinished_hint(payload, folder)}"])
    best = max(runs, key=lambda r: validation_score(r, payload.get("job") or {}))
    artifact = of_method(read_artifact(folder / "artifacts" / best.get("run_id", method)), method)
    if not chosen:
        artifact.note = best_so_far_note(payload, folder, method)
    return artifact


def best_so_far_note(payload: dict[str, Any], folder: Path, method: str) -> str:
    """Where runs of the experiment are still to finish (it is training, or was stopped), the best is only the
    best so far: said, so a prediction from a half-done comparison is not taken for the winner's."""
    from ..experiment.folder import FINISHED, saved_config, saved_flags
    from ..experiment.plan import plan_runs

    try:
        cfg, _ = saved_config(folder)
    except (TunelabInputError, OSError, ValueError, KeyError):  # an experiment of an earlier version, or copied
        return ""
    finished = {r.get("run_id", r["method"]) for r in payload.get("methods", []) if r.get("status") in FINISHED}
    waiting = [run.run_id for run in plan_runs(cfg, saved_flags(folder).get("seeds", 1))
               if run.run_id not in finished]
    if not waiting:
        return ""
    return (f"{method} is the best of the finished runs; {len(waiting)} run(s) of {str(folder)!r} have not finished "
            f"({', '.join(waiting[:4])}{', ...' if len(waiting) > 4 else ''}), so the best may still change")


def of_method(artifact: Artifact, method: str | None) -> Artifact:
    """The artifact, if it is the method's: a folder replaced by another method's (an export written over it)
    would otherwise be served under the asked-for name."""
    if method and artifact.method != method:
        raise TunelabInputError([f"{str(artifact.directory)!r} holds a {artifact.method!r} artifact where {method!r} "
                                 "was saved (replaced since?); retrain it or predict from another folder"])
    return artifact


def sweep_best_trial(folder: Path, method: str | None) -> Artifact:
    """A sweep folder's best trial: of `method`'s study, or of the best study (all score one validation metric)."""
    from ..report.markdown import read_studies
    from ..sweep.study import trial_run_id

    studies = {name: study for name, study in read_studies(folder).items() if study.get("best")}
    if method and method not in studies:
        raise TunelabInputError([f"--method: the sweep in {str(folder)!r} has no finished trial of {method!r}; "
                                 f"studies with one: {', '.join(sorted(studies)) or 'none'}"])
    if not studies:
        raise TunelabInputError([f"{str(folder)!r}: the sweep has no finished trial yet"])

    def signed(name: str) -> float:
        return studies[name]["best"]["value"] * (1 if studies[name].get("direction") == "maximize" else -1)
    name = method or max(studies, key=signed)
    trial = folder / "artifacts" / trial_run_id(name, studies[name]["best"]["number"])
    if not (trial / MANIFEST).is_file():
        raise TunelabInputError([f"{str(folder)!r}: the best {name!r} trial's artifact {str(trial)!r} is not here: "
                                 "with a shared --storage each trial's artifact stays in the folder of the worker "
                                 "that ran it; predict from that folder (or give --method for another study)"])
    return read_artifact(trial)


def validation_score(record: dict[str, Any], job: dict[str, Any]) -> tuple[float, float]:
    """With several seeds of a method, the artifact of its best validation score (chosen on validation, as
    the best checkpoint within a run is; the test split stays unseen by the choice); a tie goes to the lower
    validation loss, as between checkpoints."""
    metric, best = job.get("metric_for_best"), record.get("best_val") or {}
    value, loss = best.get(metric), best.get("loss")
    signed = float("-inf") if value is None else \
        value if (job.get("metrics") or {}).get(metric, "higher") == "higher" else -value
    return signed, float("-inf") if loss is None else -loss


def runs_of_text(payload: dict[str, Any], method: str) -> str:
    """How the method's runs ended where none succeeded (diverged: its error), for the refusal."""
    from ..models.loading import first_line

    ended = [r for r in payload.get("methods", []) if r["method"] == method and r.get("status") != "success"]
    return "".join(f" ({r.get('run_id', method)} {r['status']}: {first_line(r['error'])})"
                   if r.get("error") else f" ({r.get('run_id', method)} {r['status']})" for r in ended[:3])


def read_artifact(folder: Path) -> Artifact:
    return Artifact(folder, json.loads((folder / MANIFEST).read_text()))


def best_method(payload: dict[str, Any], folder: Path) -> str:
    ranked = [e for e in payload.get("summary") or [] if e.get("rank") == 1]
    if not ranked:
        raise TunelabInputError([f"{str(folder)!r} has no ranked method (no successful run); name one with --method"
                                 f"{unfinished_hint(payload, folder)}"])
    return ranked[0]["method"]


def unfinished_hint(payload: dict[str, Any], folder: Path) -> str:
    """A run stopped or killed has checkpoints, not an artifact: resuming finishes it."""
    if not any(r.get("status") in ("interrupted", "failed") for r in payload.get("methods", [])):
        return ""
    return f"; runs there did not finish: `tunelab compare --resume --output {folder}` finishes them"


def load_artifact(artifact: Artifact) -> tuple[nn.Module, Any]:
    """The trained model (the method rebuilds it on a fresh base model) and its tokenizer."""
    from ..methods.base import get_method
    from ..models.loading import LOAD_OPTIONS, load_pretrained, load_tokenizer, quiet_transformers

    quiet_transformers()
    tokenizer = load_tokenizer(str(artifact.directory))
    task = artifact.task
    if artifact.manifest.get("format") == "transformers":  # a whole model (full, llrd, freeze, or merged)
        model = task.auto_class().from_pretrained(artifact.directory, **LOAD_OPTIONS)
        return task.prepare_model(model, tokenizer).eval(), tokenizer
    base = task.prepare_model(load_pretrained(base_model_path(artifact), task, artifact.info), tokenizer)
    return get_method(artifact.method).load(artifact.directory, base).eval(), tokenizer


def base_model_path(artifact: Artifact) -> str:
    """The base model the artifact was trained on: its recorded folder, else (a hub or packaged model, on
    another machine) found again by name; refused where its weights are not those it was trained on."""
    from ..models.loading import resolve_model_path

    recorded, name = artifact.manifest.get("base_model"), artifact.manifest.get("base_model_name")
    if recorded and (Path(recorded) / "config.json").is_file():
        found = recorded
    elif artifact.manifest.get("base_source") == "local" or not name:
        # a local folder's name means nothing elsewhere: read against predict's working folder it found another
        raise TunelabInputError([f"{str(artifact.directory)!r}: the base model it was trained on, {recorded!r}, is "
                                 "gone; restore that folder (or `tunelab export --merge` where it exists, for a "
                                 "model that needs no base)"])
    else:
        found = resolve_model_path(name, artifact.manifest.get("revision"))
    return checked_base(artifact, found)


def checked_base(artifact: Artifact, found: str) -> str:
    """The base folder, if its weights are the ones the artifact was trained on (artifacts of earlier versions
    recorded no fingerprint: taken as they are)."""
    from ..models.fingerprint import weights_fingerprint

    expected = artifact.manifest.get("base_fingerprint")
    if expected is None or weights_fingerprint(found) == expected:
        return found
    raise TunelabInputError([f"{str(artifact.directory)!r}: the base model at {found!r} is not the one it was "
                             "trained on (its weights or config changed since); the adapter means nothing on other "
                             "weights: restore that model, or retrain on this one"])
