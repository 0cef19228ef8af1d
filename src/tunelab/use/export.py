"""`tunelab export`: the artifact as it is, or merged into one plain transformers model folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import TunelabInputError
from .artifact import MANIFEST, find_artifact, load_artifact


def export(path: str | Path, output: str | Path, method: str | None = None, merge: bool = False,
           overwrite: bool = False) -> Path:
    """Write `method`'s artifact (default: the best) to `output`; with `merge`, a folder that
    `AutoModelFor...from_pretrained` loads with the same predictions, with tokenizer and label names."""
    from ..methods.base import get_method

    artifact = find_artifact(path, method)
    out = Path(output).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TunelabInputError([f"--output: {str(out)!r} is not empty; pass --overwrite to replace it"])
    if out.exists():
        shutil.rmtree(out)
    if not merge:
        shutil.copytree(artifact.directory, out)
        return out
    model, tokenizer = load_artifact(artifact)
    merged = get_method(artifact.method).merged(model)
    out.mkdir(parents=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {**artifact.manifest, "format": "transformers", "merged_from": artifact.method}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
