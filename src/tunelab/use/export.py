"""`tunelab export`: the artifact as it is, or merged into one plain transformers model folder."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..errors import TunelabInputError
from ..models.hub import offline_option
from .artifact import MANIFEST, Artifact, find_artifact, load_artifact


@offline_option
def export(path: str | Path, output: str | Path, method: str | None = None, merge: bool = False,
           overwrite: bool = False) -> Path:
    """Write `method`'s artifact (default: the best) to `output`; with `merge`, a folder that
    `AutoModelFor...from_pretrained` loads with the same predictions, with tokenizer and label names.

    Nothing is deleted until the new folder is complete: it is written next to `output` and swapped in, so a
    refused merge or a crash leaves an earlier export as it was."""
    flags = [f"{name}: {value!r} is not allowed; must be True or False" for name, value in
             (("merge", merge), ("overwrite", overwrite)) if not isinstance(value, bool)]  # "no" is true
    if flags:
        raise TunelabInputError(flags)
    artifact = find_artifact(path, method)
    out = Path(output).expanduser().resolve()
    problems = output_problems(out, artifact, Path(path).expanduser().resolve(), overwrite)
    if problems:
        raise TunelabInputError(problems)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:  # a file where a folder should be, no permission, a read-only file system
        raise TunelabInputError([f"--output: cannot write {str(out)!r} ({exc.strerror or exc})"]) from None
    try:
        write_export(artifact, staging / "export", merge)
        if out.exists():
            shutil.rmtree(out)
        (staging / "export").rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def output_problems(out: Path, artifact: Artifact, source: Path, overwrite: bool) -> list[str]:
    """--overwrite replaces an earlier export or an empty folder; never the source, nor a folder of other files."""
    for protected in {artifact.directory.resolve(), source}:
        if out == protected or out in protected.parents or protected in out.parents:
            return [f"--output: {str(out)!r} overlaps {str(protected)!r}, which is being exported from; "
                    "choose a folder outside it"]
    if out.exists() and not out.is_dir():
        return [f"--output: {str(out)!r} is a file, not a folder"]
    experiment = next((p.parent for p in out.parents if p.name == "artifacts" and
                       any((p.parent / name).is_file() for name in ("results.json", "sweep.json", "run.json"))), None)
    if experiment is not None:  # predict would serve it under the name of the run whose folder it took
        return [f"--output: {str(out)!r} is inside the artifacts of the experiment {str(experiment)!r}, where "
                "trained artifacts live; choose a folder outside it"]
    if not out.exists() or not any(out.iterdir()):
        return []
    if not overwrite:
        return [f"--output: {str(out)!r} is not empty; pass --overwrite to replace it"]
    if not (out / MANIFEST).is_file():
        return [f"--output: {str(out)!r} is not a tunelab export (no {MANIFEST}); --overwrite replaces only "
                "an earlier export, so move its files away or choose another folder"]
    return []


def write_export(artifact: Artifact, out: Path, merge: bool) -> None:
    from ..methods.base import get_method

    if not merge or artifact.manifest.get("format") == "transformers":  # a whole model: nothing to merge
        shutil.copytree(artifact.directory, out)
    else:
        model, tokenizer = load_artifact(artifact)
        merged = get_method(artifact.method).merged(model)
        out.mkdir(parents=True)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        manifest = {**artifact.manifest, "format": "transformers", "merged_from": artifact.method}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    usable_tokenizer(out, artifact)


def usable_tokenizer(out: Path, artifact: Artifact) -> None:
    """The exported tokenizer as the model needs it outside tunelab: plain `tokenizer(..., truncation=True)`
    cuts where training did, and a generating task's prompts are left-padded, as batched `generate` needs, and
    cut from the left, as `tunelab predict` cuts them (the end of a prompt is what the answer follows)."""
    from ..models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(out))
    if artifact.manifest.get("max_length"):
        tokenizer.model_max_length = int(artifact.manifest["max_length"])
    if artifact.task.generated_positions(artifact.task_options()):
        for side in ("padding_side", "truncation_side"):
            setattr(tokenizer, side, "left")
            tokenizer.init_kwargs[side] = "left"  # transformers 5.25 saves init_kwargs, not the attribute
    tokenizer.save_pretrained(out)
