"""Models from the Hugging Face Hub: found in the local cache, else downloaded as `from_pretrained` would,
unless the machine is offline. Tokens and endpoints are huggingface_hub's own settings (HF_TOKEN, `hf auth
login`, HF_ENDPOINT); tunelab never reads, stores or logs a token.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import json
import os
from pathlib import Path

from ..errors import TunelabInputError

# What a training run needs from a model repository: configs, tokenizer files and one weight format.
CONFIG_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken"]
# transformers prefers safetensors, .bin only when it is all; both by the names from_pretrained reads (the file
# or its shards): a repository may also hold other exports, e.g. Mistral's consolidated.safetensors, as large
# again as the shards
WEIGHT_FORMATS = (["model*.safetensors"], ["pytorch_model*.bin"])


def is_offline() -> bool:
    """HF_HUB_OFFLINE=1 (also set by `tunelab --offline`), read now rather than at import time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def hub_offline(enabled: bool):
    """For the calls inside, what `--offline` does for a command: huggingface_hub, transformers and datasets
    read the variable once, at import, so their flags are switched too (and everything put back after)."""
    if not enabled or is_offline():
        yield
        return
    import datasets.config as datasets_config
    import huggingface_hub.constants as hub_constants

    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    flags = [(hub_constants, "HF_HUB_OFFLINE"), (datasets_config, "HF_HUB_OFFLINE"),
             (datasets_config, "HF_DATASETS_OFFLINE")]
    saved_flags = [getattr(module, name) for module, name in flags]
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags):
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def offline_option(function):
    """Gives a Python API function the `offline=False` keyword its command's `--offline` flag is."""
    @functools.wraps(function)
    def call(*args, offline: bool = False, **kwargs):
        if not isinstance(offline, bool):
            raise TunelabInputError([f"offline: {offline!r} is not true or false"])
        with hub_offline(offline):
            return function(*args, **kwargs)
    signature = inspect.signature(function)
    keyword = inspect.Parameter("offline", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
    call.__signature__ = signature.replace(parameters=[*signature.parameters.values(), keyword])
    return call


def is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def path_hint(name: str) -> str:
    """A relative path with a typo reads as a hub id (`models/bert-bsae`): where its folder part exists here,
    the hub error says so."""
    parent = Path(name).parent
    if str(parent) in ("", ".") or not parent.is_dir():
        return ""
    return f" (if a local path was meant: the folder {str(parent)!r} is here but holds no {Path(name).name!r})"


def hub_model_path(repo_id: str, revision: str | None, config_only: bool = False) -> str:
    """A local snapshot folder of `repo_id` at `revision`: from the cache, else downloaded (online only).
    `config_only`: its config.json is all the caller reads (`estimate`, `recommend`: a 7B model's 13 GB of
    weights are not theirs to fetch)."""
    from .loading import packaged_copy_hint

    cached = cached_snapshot(repo_id, revision)
    if cached and holds_what_is_read(cached, config_only):
        return cached
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    no_hub = "hub access is off (HF_HUB_OFFLINE=1 or --offline)" if is_offline() else unreachable_hub()
    if no_hub:
        # a snapshot an estimate fetched holds the config alone, one fetched by hand may lack the tokenizer
        state = f"is in the local Hugging Face cache without {missing_for_a_run(cached)}" if cached else \
            "is not in the local Hugging Face cache"
        # an estimate reads the config alone: fetching a 70B model's weights for it would be 140 GB for nothing
        files = " config.json" if config_only else ""
        raise TunelabInputError([
            f"model.name_or_path: {where} {state} and {no_hub}; on a connected machine fetch it once with "
            f"`hf download {repo_id}{files}" + (f" --revision {revision}" if revision else "") +
            "` (or run tunelab there without --offline), then run again" + packaged_copy_hint(repo_id)
            + path_hint(repo_id)])
    return download(repo_id, revision, where, config_only)


RESOLVE_SECONDS = 3.0


def unreachable_hub() -> str | None:
    """Why the Hub cannot be reached, where its host name does not resolve (no network), else None. Without a
    network huggingface_hub retried for 30-40 s before failing (as measured on a machine with no DNS); the name
    lookup fails at once. Behind a proxy (the variables or the system's settings, as urllib and httpx read them)
    the proxy resolves names, and a lookup that takes longer than RESOLVE_SECONDS is left to the download:
    neither is judged here."""
    import socket
    import threading
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host, proxies = endpoint.hostname, getproxies()
    if not host or ((proxies.get(endpoint.scheme) or proxies.get("all")) and not proxy_bypass(host)):
        return None
    failure: list[str] = []

    def resolve():
        try:
            socket.getaddrinfo(host, 443)
        except OSError as exc:  # socket.gaierror: the name does not resolve
            failure.append(str(exc))

    lookup = threading.Thread(target=resolve, daemon=True)
    lookup.start()
    lookup.join(RESOLVE_SECONDS)
    return f"the Hub cannot be reached (no network? {host} does not resolve: {failure[0]})" if failure else None


def cached_snapshot(repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # not cached (or an incomplete snapshot): the caller decides what to do
        return None


def holds_what_is_read(folder: str, config_only: bool) -> bool:
    """Whether a cached snapshot has the files the caller reads: the config, and for a run one weight format
    and the tokenizer too (the cache keeps whatever was fetched, an estimate's lone config.json included)."""
    return (Path(folder) / "config.json").is_file() and (config_only or not missing_for_a_run(folder))


def missing_for_a_run(folder: str) -> str:
    """What a run needs beyond the config that `folder` lacks, in words ("" when nothing)."""
    from .loading import TOKENIZER_FILES

    path = Path(folder)
    shards = missing_shards(path)
    missing = [what for what, present in (
        ("its weights", any(any(path.glob(p[0])) for p in WEIGHT_FORMATS)),
        (f"weight shards its index names ({', '.join(shards[:3])})", not shards),
        ("its tokenizer files", any((path / f).is_file() for f in TOKENIZER_FILES))) if not present]
    return " or ".join(missing)


def missing_shards(path: Path) -> list[str]:
    """The shard files a sharded checkpoint's index names that are not there (a download cut short), of the
    format loaded (safetensors where there are any: repositories ship a .bin index too, whose shards a download
    of one format never fetches)."""
    index = next((path / name for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (path / name).is_file()), None)
    if index is None:
        return []
    try:
        names = set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        return []
    return sorted(name for name in names if not (path / name).is_file())


def wanted_patterns(repo_id: str, revision: str | None, config_only: bool) -> list[str]:
    """The files to fetch: the config alone for an estimate; configs, tokenizer and one weight format for a run."""
    from huggingface_hub import HfApi

    if config_only:
        return ["config.json"]
    files = HfApi().list_repo_files(repo_id, revision=revision)
    return CONFIG_PATTERNS + next((p for p in WEIGHT_FORMATS if fnmatch.filter(files, p[0])), [])


def download(repo_id: str, revision: str | None, where: str, config_only: bool = False) -> str:
    from huggingface_hub import errors, snapshot_download

    try:
        patterns = wanted_patterns(repo_id, revision, config_only)
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except errors.GatedRepoError:
        problem = "is gated: accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)"
    except errors.RepositoryNotFoundError:
        problem = "does not exist on the Hub, or is private and no token with access is set (HF_TOKEN)"
    except errors.RevisionNotFoundError:
        problem = "has no such revision (model.revision)"
    except Exception as exc:  # network errors come in many kinds; the user needs the cause
        problem = (f"could not be downloaded ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}); "
                   "without a network, pass --offline to use the local cache only")
    raise TunelabInputError([f"model.name_or_path: {where} {problem}{path_hint(repo_id)}"])
