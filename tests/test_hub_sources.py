"""Models and datasets beyond local files: a dataset folder, a save_to_disk folder with ClassLabel labels, hub ids
(cached, offline, downloaded) and the mapping of a dataset's split names to train/validation/test.

No network is reachable here: the download path is checked against a stand-in for huggingface_hub's calls."""
from __future__ import annotations

import fnmatch
import json
import os

import datasets
import pytest

from tunelab import validate
from tunelab.cli import main
from tunelab.errors import TunelabInputError
from tunelab.models import hub

from conftest import fake_hub, toy_rows


@pytest.fixture
def model_args(tiny_bert):
    return [f"model.name_or_path={tiny_bert}", "data.max_length=32", "train.batch_size=8", "methods=lora"]


def test_a_folder_of_csv_files_is_a_dataset(tmp_path, model_args):
    folder = tmp_path / "reviews"
    folder.mkdir()
    toy_rows(120, 1).to_csv(folder / "train.csv", index=False)
    toy_rows(30, 2).to_csv(folder / "test.csv", index=False)
    summary = validate(overrides=[*model_args, f"data.dataset={folder}"]).summary()
    assert (summary["train_rows"] + summary["validation_rows"], summary["test_rows"]) == (120, 30)
    assert summary["validation_source"] == "carved from train"


def test_a_folder_of_csv_files_reads_fields_as_text_as_a_train_file_does(tmp_path, model_args):
    folder = tmp_path / "coded"
    folder.mkdir()
    rows = toy_rows(60, 1)
    rows["label"] = ["01", "02", "NA"] * 20  # "01" is not 1, and a class may be called NA
    rows.to_csv(folder / "train.csv", index=False)
    job = validate(overrides=[*model_args, f"data.dataset={folder}"])
    assert job.label_names == ["01", "02", "NA"]


def test_a_csv_folder_is_checked_as_a_train_file_is(tmp_path, model_args):
    """A repeated column name, or a row with an unquoted comma that shifted every field, passed in a folder
    (read by datasets' csv builder) where data.train_file refuses them; a TSV field over 128 KiB beside a
    literal quote was refused by Python's csv field limit."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label,label\ngood,pos,neg\n")
    with pytest.raises(TunelabInputError, match="train.csv' does not read as a table: column 'label' is named twice"):
        validate(overrides=[*model_args, f"data.dataset={folder}"])
    rows = toy_rows(40, 1)
    (folder / "train.csv").write_text("text,label\n" + "great, really,pos\n" + rows.to_csv(index=False, header=False))
    with pytest.raises(TunelabInputError, match="line 2 has 3 fields but the header has 2"):
        validate(overrides=[*model_args, f"data.dataset={folder}"])
    rows.to_csv(folder / "train.csv", index=False)
    rows.rename(columns={"text": "review"}).to_csv(folder / "train-2.csv", index=False)
    with pytest.raises(TunelabInputError, match="the train files of .* have different columns: train-2.csv: review, "
                                                "label; train.csv: text, label"):
        validate(overrides=[*model_args, f"data.dataset={folder}"])
    (folder / "train.csv").unlink()
    (folder / "train-2.csv").unlink()
    rows.loc[0, "text"] = 'a 5" box ' + "good " * 40_000  # 200 KB in one field, and a literal quote
    rows.to_csv(folder / "train.tsv", sep="\t", index=False, quoting=3)
    job = validate(overrides=[*model_args, f"data.dataset={folder}"])
    assert max(len(text) for frame in job.data.frames.values() for text in frame.text) > 200_000


def test_each_split_of_a_csv_folder_keeps_its_own_columns(tmp_path, model_args):
    """test.csv with an extra id column reads (one set of columns forced on every file failed); an unlabelled
    test.csv is refused as the test split, not as train (whose label column was dropped)."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    toy_rows(120, 1).to_csv(folder / "train.csv", index=False)
    test = toy_rows(30, 2)
    test.insert(0, "id", range(30))
    test.to_csv(folder / "test.csv", index=False)
    assert validate(overrides=[*model_args, f"data.dataset={folder}"]).summary()["test_rows"] == 30
    test.drop(columns=["label"]).to_csv(folder / "test.csv", index=False)
    with pytest.raises(TunelabInputError) as refused:
        validate(overrides=[*model_args, f"data.dataset={folder}"])
    assert refused.value.problems == [
        "data.label_column: column 'label' not in data.dataset (test); columns are: id, text; an unlabelled test "
        "split cannot score the methods: name a labelled one with data.test_split (the validation split's name is "
        "allowed)"]


def class_label_dataset() -> datasets.DatasetDict:
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})

    def split(n, seed, unlabelled=False):
        rows = toy_rows(n, seed)
        labels = [-1] * n if unlabelled else [int(v == "pos") for v in rows.label]
        return datasets.Dataset.from_dict({"sentence": rows.text.tolist(), "label": labels}, features=features)

    return datasets.DatasetDict(train=split(100, 1), validation_matched=split(20, 2), test=split(20, 3, True))


def test_class_label_names_and_split_mapping_from_a_saved_dataset(tmp_path, model_args):
    folder = tmp_path / "saved"
    class_label_dataset().save_to_disk(str(folder))
    job = validate(overrides=[*model_args, f"data.dataset={folder}", "data.text_column=sentence",
                              "data.validation_split=validation_matched", "data.test_split=validation_matched"])
    assert job.label_names == ["neg", "pos"]
    assert (len(job.validation), len(job.test)) == (20, 20)


def test_unlabelled_rows_are_refused_or_dropped_and_counted(tmp_path, model_args):
    folder = tmp_path / "saved"
    class_label_dataset().save_to_disk(str(folder))
    base = [*model_args, f"data.dataset={folder}", "data.text_column=sentence"]
    with pytest.raises(TunelabInputError, match="20 rows have no 'label' label"):
        validate(overrides=base)  # the test split is unlabelled (-1), as in GLUE
    with pytest.raises(TunelabInputError, match="no rows left after data.drop_invalid_rows dropped all 20"):
        validate(overrides=[*base, "data.drop_invalid_rows=true"])


def test_invalid_rows_are_named_by_row_or_dropped_and_counted(tmp_path, model_args):
    rows = toy_rows(100, 1)
    rows.loc[[3, 7], "text"] = " "
    rows.loc[9, "label"] = None
    path = tmp_path / "train.csv"
    rows.to_csv(path, index=False)
    base = [*model_args, f"data.train_file={path}"]
    with pytest.raises(TunelabInputError) as refused:
        validate(overrides=base)
    assert any("2 rows have an empty 'text' (rows 3, 7, counted from 0)" in p for p in refused.value.problems)
    assert any("1 rows have no 'label' label (rows 9," in p for p in refused.value.problems)
    job = validate(overrides=[*base, "data.drop_invalid_rows=true"])
    assert job.data.dropped == {"train: an empty 'text'": 2, "train: no 'label' label": 1}
    assert len(job.train) + len(job.validation) == 97
    assert job.summary()["dropped_rows"] == job.data.dropped


def test_a_split_name_the_dataset_lacks_is_named_with_the_alternatives(tmp_path, model_args):
    folder = tmp_path / "saved"
    class_label_dataset().save_to_disk(str(folder))
    with pytest.raises(TunelabInputError, match="no split 'dev'; its splits are: train, validation_matched, test"):
        validate(overrides=[*model_args, f"data.dataset={folder}", "data.validation_split=dev"])


def test_a_hub_dataset_id_goes_through_datasets_with_its_config(monkeypatch, model_args):
    calls = []

    def load_dataset(name, config=None, revision=None):
        calls.append((name, config, revision))
        return class_label_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    job = validate(overrides=[*model_args, "data.dataset=someone/reviews", "data.dataset_config=en",
                              "data.text_column=sentence", "data.test_split=validation_matched"])
    assert calls == [("someone/reviews", "en", None)]
    assert job.label_names == ["neg", "pos"] and len(job.test) == 20


def test_a_config_name_for_a_saved_dataset_is_refused_not_ignored(tmp_path, model_args):
    folder = tmp_path / "saved"
    class_label_dataset().save_to_disk(str(folder))
    with pytest.raises(TunelabInputError, match="data.dataset_config: 'mnli' names a config, but .* is a saved "):
        validate(overrides=[*model_args, f"data.dataset={folder}", "data.dataset_config=mnli"])


@pytest.mark.parametrize("failure, config, hint", [
    (ConnectionError("Max retries exceeded with url"), "mnli", "check the network connection"),
    (ValueError("Config name is missing. Please pick one among the available configs"), None,
     "for a dataset with several configs set data.dataset_config"),
])
def test_an_online_hub_dataset_failure_says_what_to_do_about_it(monkeypatch, model_args, failure, config, hint):
    def load_dataset(*args, **kwargs):
        raise failure

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("tunelab.data.sources.is_offline", lambda: False)
    monkeypatch.setattr("tunelab.data.sources.unreachable_hub", lambda: None)  # a network, then the failure
    overrides = [*model_args, "data.dataset=nyu-mll/glue", *([f"data.dataset_config={config}"] if config else [])]
    with pytest.raises(TunelabInputError) as info:
        validate(overrides=overrides)
    message = next(p for p in info.value.problems if p.startswith("data.dataset:"))
    assert hint in message and ("set data.dataset_config" in message) == (config is None)


def test_offline_hub_ids_exit_2_saying_so(tmp_path, capsys):
    code = main(["validate", "--offline", "model.name_or_path=nobody/no-such-model",
                 "data.dataset=nobody/no-such-data"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'nobody/no-such-model' is not in the local Hugging Face cache and hub access is off" in err
    assert "hf download nobody/no-such-model`" in err
    assert "'nobody/no-such-data' is not in the local datasets cache and hub access is off" in err
    # an estimate reads the config alone: the hint fetches that, not a model's weights
    assert main(["estimate", "--offline", "model.name_or_path=nobody/no-such-model"]) == 2
    assert "hf download nobody/no-such-model config.json`" in capsys.readouterr().err


def test_offline_true_in_python_is_the_flag_for_that_call_only(monkeypatch):
    """The API's offline=True does what --offline does, in a process that is online, and leaves it online."""
    import huggingface_hub.constants

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE")]
    for module, name in flags:
        monkeypatch.setattr(module, name, False)
    seen_inside = []
    monkeypatch.setattr(hub, "cached_snapshot", lambda *args: seen_inside.append(
        [getattr(module, name) for module, name in flags]))
    with pytest.raises(TunelabInputError) as info:
        validate(overrides=["model.name_or_path=nobody/no-such-model", "data.dataset=nobody/no-such-data"],
                 offline=True)
    problems = "\n".join(info.value.problems)
    assert "'nobody/no-such-model' is not in the local Hugging Face cache and hub access is off" in problems
    assert "'nobody/no-such-data' is not in the local datasets cache and hub access is off" in problems
    assert seen_inside == [[True, True, True]]  # what huggingface_hub, transformers and datasets read
    assert [getattr(module, name) for module, name in flags] == [False, False, False]
    assert not any(name in os.environ for name in hub.OFFLINE_VARIABLES)
    with pytest.raises(TunelabInputError, match="offline: 'yes' is not true or false"):
        validate(offline="yes")


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")


def test_without_a_network_a_hub_id_fails_at_once_and_a_cached_dataset_is_used(monkeypatch, tmp_path, capsys):
    """A host name that does not resolve is no network: huggingface_hub and datasets retried for 30-40 s."""
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    for name in (*hub.OFFLINE_VARIABLES, *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    used_offline, downloads = [], []

    def load_dataset(*args, **kwargs):
        used_offline.append(hub.is_offline())
        raise ConnectionError("not in the cache")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "download", lambda *args, **kwargs: downloads.append(args))
    assert main(["validate", "model.name_or_path=nobody/no-such-model", "data.dataset=nobody/no-such-data"]) == 2
    assert downloads == []  # no try on the network: huggingface_hub retried it for 30 s
    err = capsys.readouterr().err
    reason = "the Hub cannot be reached (no network? huggingface.co does not resolve: [Errno -2] Name or service"
    assert f"'nobody/no-such-model' is not in the local Hugging Face cache and {reason}" in err
    assert f"'nobody/no-such-data' is not in the local datasets cache and {reason}" in err
    assert used_offline == [True]  # a cached copy would have been read, without a try on the network
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy resolves names: not judged here
    assert hub.unreachable_hub() is None
    monkeypatch.setenv("NO_PROXY", "huggingface.co")  # ... unless it is bypassed for the Hub
    assert "does not resolve" in hub.unreachable_hub()


def test_a_slow_name_lookup_is_left_to_the_download(monkeypatch):
    import socket
    import time

    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args: time.sleep(2))
    monkeypatch.setattr(hub, "RESOLVE_SECONDS", 0.1)
    assert hub.unreachable_hub() is None


def test_online_a_model_is_downloaded_at_its_revision_with_one_weight_format(monkeypatch, tiny_bert):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            return ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin", "vocab.txt"]

    def snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        calls.append((repo_id, revision, allow_patterns))
        return str(tiny_bert)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "unreachable_hub", lambda: None)
    assert hub.hub_model_path("someone/bert", "v1.0") == str(tiny_bert)
    (repo, revision, patterns), = calls
    assert (repo, revision) == ("someone/bert", "v1.0")
    # one weight format, by the names from_pretrained reads: not a second export (consolidated.safetensors)
    assert [f for f in Api().list_repo_files("x") if any(fnmatch.fnmatch(f, p) for p in patterns)] == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "vocab.txt"]


def test_a_cached_snapshot_without_tokenizer_files_is_completed_online_and_named_offline(tmp_path, tiny_bert,
                                                                                         monkeypatch):
    """`hf download org/model config.json model.safetensors` caches a model a run cannot tokenize for."""
    import shutil

    import huggingface_hub

    weights_only = tmp_path / "weights-only"
    shutil.copytree(tiny_bert, weights_only, ignore=shutil.ignore_patterns("tokenizer*", "vocab*"))
    fake_hub_cache(tmp_path / "hub", "someone/bert", weights_only)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TunelabInputError, match="'someone/bert' is in the local Hugging Face cache without its "
                                                "tokenizer files and hub access is off"):
        hub.hub_model_path("someone/bert", None)
    assert hub.hub_model_path("someone/bert", None, config_only=True).endswith("0123456789abcdef01234567")
    fetched = []
    fake_hub(monkeypatch, tiny_bert, fetched)
    assert hub.hub_model_path("someone/bert", None) == str(tiny_bert)  # online: the rest is fetched
    (_, _, patterns), = fetched
    assert "*.txt" in patterns and "*.json" in patterns


def test_a_cached_snapshot_missing_a_shard_is_named_offline(tmp_path, tiny_bert, monkeypatch):
    """A download cut short keeps some shards: the index names the rest (a bare FileNotFoundError later)."""
    import shutil

    import huggingface_hub

    sharded = shutil.copytree(tiny_bert, tmp_path / "sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    fake_hub_cache(tmp_path / "hub", "someone/bert", sharded)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TunelabInputError, match=r"without weight shards its index names \(model-00002-of-00002"):
        hub.hub_model_path("someone/bert", None)
    # complete: the .bin index beside it names shards of the format not fetched, which are not missed
    (sharded / "model-00002-of-00002.safetensors").write_bytes(b"")
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
    assert hub.missing_shards(sharded) == []


def test_hub_ids_and_paths_are_told_apart():
    assert hub.is_hub_id("bert-base-uncased") and hub.is_hub_id("org/model")
    assert not any(hub.is_hub_id(p) for p in ("./model", "/abs/model", "~/m", "a/b/c"))


def fake_hub_cache(root, repo_id: str, model_folder) -> None:
    """The Hugging Face cache layout (models--org--name/refs/main → snapshots/<commit>/...) around a model."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_cached_model_and_a_folder_dataset_run_end_to_end_offline(tmp_path, tiny_bert):
    import os
    import subprocess
    import sys

    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-bert", tiny_bert)
    data = tmp_path / "reviews"
    data.mkdir()
    toy_rows(120, 1).to_csv(data / "train.csv", index=False)
    toy_rows(30, 2).to_csv(data / "test.csv", index=False)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "tunelab.cli", "compare", "--offline", "--no-progress",
                          "--output", str(out), "model.name_or_path=tiny-org/tiny-bert", f"data.dataset={data}",
                          "data.max_length=32", "train.batch_size=8", "train.max_steps=3", "methods=lora"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["job"]["model_path"].startswith(str(tmp_path / "hub" / "models--tiny-org--tiny-bert"))
    assert results["job"]["test_rows"] == 30
    predicted = subprocess.run([sys.executable, "-m", "tunelab.cli", "predict", "--offline", str(out),
                                "--text", "the tea was lovely"], capture_output=True, text=True, env=env,
                               timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert json.loads(predicted.stdout)["label"] in ("neg", "pos")


def test_a_hub_id_means_the_hubs_weights_not_the_packaged_copy(capsys):
    """HuggingFaceTB/SmolLM2-135M-Instruct loaded the packaged 4-bit GGUF, online too: other weights than the
    id names. Offline it is refused, pointing at the packaged copy by its own name."""
    from tunelab.cli import main
    from tunelab.models.loading import resolve_model_path

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert main(["validate", "--offline", "task=causal-lm", f"model.name_or_path={hub_id}"]) == 2
    err = capsys.readouterr().err
    assert f"'{hub_id}' is not in the local Hugging Face cache" in err
    assert ("or train on the packaged copy (its 4-bit GGUF weights, dequantized): "
            "model.name_or_path=SmolLM2-135M-Instruct") in err
    assert resolve_model_path("packaged:all-MiniLM-L6-v2") == resolve_model_path("all-MiniLM-L6-v2")


def test_a_mistyped_relative_path_is_named_as_one_beside_the_hub_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--offline", "model.name_or_path=models/bert-bsae", "data.dataset=models/reviwes"]) == 2
    err = capsys.readouterr().err
    assert "(if a local path was meant: the folder 'models' is here but holds no 'bert-bsae')" in err
    assert "(if a local path was meant: the folder 'models' is here but holds no 'reviwes')" in err
