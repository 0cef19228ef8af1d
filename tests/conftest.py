"""Shared fixtures: a tiny randomly initialised BERT built from a config here, and a toy labelled task."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs two workers on two cores) each worker and the processes its tests start
# use one thread, unless the caller set a number: two workers with torch's default of one thread per core
# oversubscribed the cores (1.6x the CPU time, no faster). Set before torch is imported, which reads it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# compare appends to a results store; the tests' comparisons must not land in the user's
import tempfile  # noqa: E402

os.environ["TUNELAB_RESULTS_DB"] = os.path.join(tempfile.mkdtemp(prefix="tunelab-store-"), "results.db")
# nor the machine measurements (device profiles, precision decisions) in the user's cache
os.environ["TUNELAB_CACHE"] = tempfile.mkdtemp(prefix="tunelab-cache-")

import random  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

POSITIVE = ["good", "great", "tasty", "fresh", "lovely", "yummy"]
NEGATIVE = ["bad", "stale", "awful", "bland", "soggy", "nasty"]
FILLER = ["the", "food", "was", "very", "and", "box", "tea", "snack", "price", "taste", "i", "it"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


# Tests compare independent runs with each other: precision auto could measure a near tie differently in each
# (tiny models run about as fast in both), so the tiny jobs pin it; tests/test_precision.py covers auto.
PINNED = ["train.precision=fp32"]


def toy_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """A learnable task: the label is whether the review holds a positive or a negative word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 14))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return pd.DataFrame(rows)


def build_tiny_bert(folder: Path, layers: int = 2) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.3)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)  # a base model: only the classifier head will be new
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("toy-data")
    paths = {}
    for split, n, seed in (("train", 160, 1), ("validation", 40, 2), ("test", 40, 3)):
        paths[split] = folder / f"{split}.csv"
        toy_rows(n, seed).to_csv(paths[split], index=False)
    return paths


@pytest.fixture
def tiny_overrides(tiny_bert, toy_data) -> list[str]:
    """Overrides that point tunelab at the tiny model and toy data, small enough to run in seconds."""
    return [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
            f"data.validation_file={toy_data['validation']}", f"data.test_file={toy_data['test']}",
            "data.max_length=32", "train.batch_size=8", "train.eval_every_steps=10", "train.epochs=1", *PINNED]


# --- causal LM: a tiny Llama with a word-level tokenizer and a chat template, and a learnable Q/A task ------
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")
LM_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
LM_WORDS = ["user", "assistant", "system", ":", "opposite", "of", "what", "is", *POSITIVE, *NEGATIVE, *FILLER]


def build_tiny_llama(folder: Path, chat_template: bool = True) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(LM_SPECIAL + LM_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True,
                         initializer_range=0.3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def toy_qa_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """A learnable mapping: 'what is opposite of <positive word>' → the negative word at the same index."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(len(POSITIVE))
        rows.append({"prompt": f"what is opposite of {POSITIVE[i]}", "response": NEGATIVE[i]})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def toy_qa(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("toy-qa")
    paths = {}
    for split, n, seed in (("train", 120, 1), ("validation", 24, 2), ("test", 24, 3)):
        paths[split] = folder / f"{split}.jsonl"
        toy_qa_rows(n, seed).to_json(paths[split], orient="records", lines=True)
    return paths


@pytest.fixture
def tiny_causal_overrides(tiny_llama, toy_qa) -> list[str]:
    return ["task=causal-lm", f"model.name_or_path={tiny_llama}", f"data.train_file={toy_qa['train']}",
            f"data.validation_file={toy_qa['validation']}", f"data.test_file={toy_qa['test']}",
            "data.max_length=32", "train.batch_size=8", "train.eval_every_steps=10", "train.epochs=1",
            "causal-lm.generation_samples=4", "causal-lm.max_new_tokens=4", *PINNED]


@pytest.fixture
def task_overrides(request, tiny_overrides, tiny_causal_overrides):
    """Overrides for a tiny job of each registered task (a task without an entry fails the matrix)."""
    return {"classification": tiny_overrides, "causal-lm": tiny_causal_overrides}


def fake_hub(monkeypatch, snapshot, fetched: list):
    """huggingface_hub online without a network: a cached snapshot is looked up as usual, a download is recorded
    (repository, revision, patterns) and answered with `snapshot`."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None):
        if local_files_only:
            return real(repo_id, revision=revision, local_files_only=True)
        fetched.append((repo_id, revision, allow_patterns))
        return str(snapshot)

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            return ["config.json", "model.safetensors", "tokenizer.json"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr("tunelab.models.hub.unreachable_hub", lambda: None)  # its host name resolves


# --- the real command, cheaply ------------------------------------------------------------------------------
# A `python -m tunelab.cli` child spends ~5 s importing torch, transformers and peft and starts a fork server of
# its own for its runs; here the command runs in this process, whose server is already warm, or forked from
# that server, where a test needs the command's own process (to stop or kill it).
def cli_here(args: list[str], fault: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tunelab ARGS` in this process: exit code and stderr, with TUNELAB_FAULT (and `env`) set for its runs."""
    import contextlib
    import io

    from tunelab.cli import main

    settings = {"TUNELAB_FAULT": fault, **(env or {})}
    before, err = {name: os.environ.get(name) for name in settings}, io.StringIO()
    os.environ.update(settings)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def cli_forked(args: list[str], fault: str = "", timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tunelab ARGS` in its own process, forked from this process's preloaded server as a run's is."""
    from tunelab.experiment.forkserver import run_captured

    code, out, err = run_captured("tunelab.cli", args, timeout, {**(env or os.environ), "TUNELAB_FAULT": fault})
    return subprocess.CompletedProcess(args, code, out, err)


def cli_forked_together(commands: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Several `tunelab` commands at once, each in its own forked process (as cli_forked): exit codes, stderr."""
    import tempfile

    from tunelab.experiment.forkserver import start_process

    errors, quiet = [tempfile.TemporaryFile() for _ in commands], os.open(os.devnull, os.O_WRONLY)
    try:
        processes = [start_process("tunelab.cli", args, dict(os.environ), (0, quiet, err.fileno()))
                     for args, err in zip(commands, errors)]
        done = []
        for args, process, err in zip(commands, processes, errors):
            code = process.wait(timeout)
            err.seek(0)
            done.append(subprocess.CompletedProcess(args, code, "", err.read().decode(errors="replace")))
        return done
    finally:
        os.close(quiet)
        for err in errors:
            err.close()
