"""The bad-input corpus: each case exits 2 with one clear line naming the field/file/value, no traceback,
and nothing written."""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tunelab.cli import main

from conftest import toy_rows


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, pd.DataFrame):
        content.to_csv(path, index=False)
    else:
        path.write_text(content)
    return path


HEADER_ONLY = "text,label\n"


# name → (function(tmp_path, tiny_bert, base_overrides) → (argv items), expected fragments of the message)
def case_yaml_syntax(tmp, bert, base):
    return [str(write(tmp / "c.yaml", "train:\n  lr: [1, 2\n")), *base], ["not valid YAML at line"]


def case_config_missing(tmp, bert, base):
    return [str(tmp / "nope.yaml"), *base], ["config: file", "does not exist"]


def case_config_not_mapping(tmp, bert, base):
    return [str(write(tmp / "c.yaml", "- a\n- b\n")), *base], ["must hold a mapping"]


TWICE = "text,label,label\ngood,pos,neg\n"
BROKEN_JSON_LINES = '{"text": "good", "label": "pos"}\n{"text": "bad", label: neg}\n'  # a name unquoted
def case_model_folder_with_adapter(tmp, bert, base, weights=True):
    folder = tmp / "model"
    if weights:
        shutil.copytree(bert, folder)
    else:
        folder.mkdir()
    write(folder / "adapter_config.json", '{"peft_type": "LORA", "base_model_name_or_path": "org/base"}')
    return [*base, f"model.name_or_path={folder}"], [
        "holds a PEFT adapter of 'org/base' (adapter_config.json) beside the model's weights" if weights else
        "is a PEFT adapter of 'org/base', not a model: give its base model"]


def case_tokenizer_larger_than_the_model(tmp, bert, base):
    from transformers import BertConfig, BertModel

    folder = shutil.copytree(bert, tmp / "small-vocab")
    config = BertConfig.from_pretrained(folder)
    config.vocab_size = 8  # the tokenizer's ids go past it
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar is not the command's output
        BertModel(config).save_pretrained(folder)
    return [*base, f"model.name_or_path={folder}"], ["gives token ids up to", "but the model's embeddings have 8 rows"]


def case_model_with_custom_code(tmp, bert, base):
    import json

    folder = shutil.copytree(bert, tmp / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my-own-bert", auto_map={"AutoConfig": "configuration_mine.MineConfig",
                                                      "AutoModel": "modeling_mine.MineModel"})
    write(folder / "config.json", json.dumps(config))
    return [*base, f"model.name_or_path={folder}"], [
        "needs its own Python code (configuration_mine.py, modeling_mine.py, config.json's auto_map), which tunelab "
        "does not run"]


def case_checkpoint_short_of_its_config(tmp, bert, base):
    import json

    from transformers import BertConfig, BertModel

    folder = shutil.copytree(bert, tmp / "short")
    (folder / "model.safetensors").unlink()
    config = BertConfig.from_pretrained(folder)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar is not the command's output
        BertModel(BertConfig.from_dict({**config.to_dict(), "num_hidden_layers": 1})).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))  # two blocks, weights for one
    return [*base, f"model.name_or_path={folder}"], ["of the model's backbone (bert.encoder.layer.1.",
                                                     "tunelab refuses to train random weights"]


CASES = {
    "yaml syntax error": case_yaml_syntax,
    "a section written twice": lambda t, b, base: (
        [str(write(t / "c.yaml", "train:\n  lr: 0.001\ntrain:\n  epochs: 2\n")), *base],
        ["not valid YAML at line 3, column 1: 'train' is written twice in one mapping"]),
    "config file missing": case_config_missing,
    "config is a list": case_config_not_mapping,
    "unknown key": lambda t, b, base: ([*base, "train.learning_rate=1"],
                                       ["train.learning_rate: unknown key (did you mean 'lr'?)"]),
    "peft spelling of a key": lambda t, b, base: ([*base, "lora.rank=8"], ["lora.rank: unknown key (did you mean 'r'?)"]),
    "method in the wrong case": lambda t, b, base: (
        [*base, "methods=full,LoRA"], ["unknown method 'LoRA' (did you mean 'lora'?)"]),
    "unknown section": lambda t, b, base: ([*base, "optimiser.lr=1"], ["optimiser: unknown key"]),
    "wrong type": lambda t, b, base: ([*base, "train.epochs=many"], ["train.epochs: expected a number, got 'many'"]),
    "zero epochs": lambda t, b, base: ([*base, "train.epochs=0"], ["train.epochs: 0.0 is not allowed; must be > 0"]),
    "negative lr": lambda t, b, base: ([*base, "train.lr=-0.1"], ["train.lr: -0.1 is not allowed; must be > 0"]),
    "zero max_length": lambda t, b, base: ([*base, "data.max_length=0"], ["data.max_length: 0 is not allowed"]),
    "negative eval samples": lambda t, b, base: ([*base, "data.max_eval_samples=-5"], ["data.max_eval_samples"]),
    "llrd decay above one": lambda t, b, base: ([*base, "llrd.decay=1.5"], ["llrd.decay: 1.5 is not allowed; must be <= 1"]),
    # every adapter input zeroed: the adapter got no gradient, and the run said success
    "lora dropout of one": lambda t, b, base: ([*base, "methods=lora", "lora.dropout=1"],
                                               ["lora.dropout: 1.0 is not allowed; must be < 1"]),
    # below the special tokens the tokenizer gave up truncating: whole rows, past the model's positions
    "max_length the special tokens fill": lambda t, b, base: (
        [*base, "data.max_length=2"], ["data.max_length: 2 leaves no room for text: the tokenizer adds 2 special "
                                       "tokens; allowed: at least 3"]),
    "validation file is the train file": lambda t, b, base: (
        [*base, "data.validation_file=" + next(a for a in base if a.startswith("data.train_file=")).split("=", 1)[1]],
        ["is also data.train_file (a model chosen or scored on rows it trained on)"]),
    "unknown method": lambda t, b, base: ([*base, "methods=full,lroa"], ["unknown method 'lroa' (did you mean 'lora'?)"]),
    "duplicated method": lambda t, b, base: ([*base, "methods=full,full"], ["'full' is listed twice"]),
    "lora targets match nothing": lambda t, b, base: (
        [*base, "methods=lora", "lora.target_modules=qv_proj"], ["lora.target_modules: 'qv_proj' matches no", "query"]),
    "model path missing": lambda t, b, base: ([*base, f"model.name_or_path={t}/no-model"], ["model.name_or_path", "no-model"]),
    "model path is not a model": lambda t, b, base: ([*base, f"model.name_or_path={t}"], ["without config.json"]),
    "tokenizer missing": lambda t, b, base: ([*base, f"model.name_or_path={no_tokenizer(t, b)}"], ["no tokenizer"]),
    "model weights missing": lambda t, b, base: ([*base, f"model.name_or_path={no_weights(t, b)}"], ["no weight files"]),
    "weights of another model class": lambda t, b, base: (
        [*base, f"model.name_or_path={renamed_weights(t, b)}"], ["lacks pretrained weights for", "does not match"]),
    "data file missing": lambda t, b, base: ([*base, f"data.train_file={t}/missing.csv"], ["data.train_file", "does not exist"]),
    "data file empty": lambda t, b, base: ([*base, f"data.train_file={write(t / 'e.csv', '')}"], ["data.train_file", "is empty"]),
    "an unquoted comma in the first row's text": lambda t, b, base: (
        [*base, "data.train_file=" + str(write(t / "c.csv", "text,label\ntasty, but bland,pos\n" + "fine,neg\n" * 30))],
        ["data.train_file", "line 2 has 3 fields but the header has 2: a field that contains a comma needs quotes"]),
    "semicolons between fields": lambda t, b, base: (
        [*base, "data.train_file=" + str(write(t / "s.csv", "text;label\n" + "good;pos\nbad;neg\n" * 20))],
        ["columns are: text;label (one column named with ';' in it: the file separates fields by ';'"]),
    "text pair column is the text column": lambda t, b, base: (
        [*base, "data.text_pair_column=text"], ["data.text_pair_column: 'text' is also data.text_column"]),
    "a folder of data files as data.train_file": lambda t, b, base: (
        [*base, f"data.train_file={t}"], ["is a folder but not a datasets.save_to_disk one", "data.dataset="]),
    "header only": lambda t, b, base: ([*base, "data.train_file=" + str(write(t / "h.csv", HEADER_ONLY))], ["has no rows"]),
    "wrong extension": lambda t, b, base: ([*base, f"data.train_file={write(t / 'd.txt', 'x')}"], ["extension '.txt'", ".csv"]),
    "undecodable bytes": lambda t, b, base: (
        [*base, f"data.train_file={write(t / 'b.csv', b'text,label' + bytes([10, 0xFF, 0xFE]) + b',1' + bytes([10]))}"],
        ["not UTF-8 text (bad byte 0xff at offset 11, line 2)"]),
    "missing text column": lambda t, b, base: ([*base, "data.text_column=review"], ["data.text_column: column 'review'", "text, label"]),
    "missing label column": lambda t, b, base: ([*base, "data.label_column=stars"], ["data.label_column: column 'stars'"]),
    "misspelt column": lambda t, b, base: (
        [*base, "data.text_column=txt"], ["data.text_column: column 'txt' not in data.train_file (did you mean 'text'?)"]),
    "unseen validation labels": lambda t, b, base: (
        [*base, f"data.validation_file={write(t / 'v.csv', relabel(toy_rows(20), 'meh'))}"], ["data.validation_file", "'meh'"]),
    "one class only": lambda t, b, base: (
        [*base, f"data.train_file={write(t / 'o.csv', relabel(toy_rows(20), 'pos'))}"], ["one class only"]),
    "list labels (multi-label data)": lambda t, b, base: (
        [*base, f"data.train_file={list_labels(t)}"], ["data.train_file: 20 rows have a list", "one label per row"]),
    "empty texts": lambda t, b, base: (
        [*base, f"data.train_file={write(t / 'x.csv', blank_texts(toy_rows(20)))}"], ["rows have an empty 'text'"]),
    "max_length beyond the model": lambda t, b, base: ([*base, "data.max_length=100"], ["data.max_length: 100", "1..64"]),
    "virtual tokens beyond the model": lambda t, b, base: (
        [*base, "data.max_length=60", "methods=prompt-tuning", "prompt-tuning.num_virtual_tokens=10"], ["lower data.max_length to 54"]),
    "batch larger than data": lambda t, b, base: ([*base, "train.batch_size=1000"], ["train.batch_size: 1000 is larger"]),
    "tokenizer that yields no tokens": lambda t, b, base: (
        [*base, f"model.name_or_path={tokenless(t, b)}"], ["rows become no tokens at all with the tokenizer"]),
    "accumulation steps beyond the batch": lambda t, b, base: (
        [*base, "train.batch_size=2", "train.gradient_accumulation_steps=4"], ["train.batch_size: 2 rows cannot fill"]),
    "fsdp in one process": lambda t, b, base: ([*base, "train.fsdp=true"], ["train.fsdp: needs several processes"]),
    "empty lora targets": lambda t, b, base: ([*base, "methods=lora", "lora.target_modules=[]"],
                                              ["lora.target_modules: [] is not allowed; name at least 1"]),
    "more threads than cores": lambda t, b, base: ([*base, "train.threads=100000"], ["train.threads: 100000 is more"]),
    "seed outside numpy's range": lambda t, b, base: ([*base, "train.seed=-5"], ["train.seed: -5 is not allowed"]),
    "sweep range of an option that does not exist": lambda t, b, base: (
        [*base, "sweep.space={lora.rnk: {low: 1, high: 4}}", "methods=lora"], ["sweep.space.lora.rnk: lora has no"]),
    "a sweep choice the option refuses": lambda t, b, base: (
        [*base, "sweep.space={lora.r: {choices: [8, 0]}}", "methods=lora"], ["sweep.space.lora.r: 0 is not allowed"]),
    "a JSON Lines row that is not JSON": lambda t, b, base: (
        [*base, f"data.train_file={write(t / 'bad.jsonl', BROKEN_JSON_LINES)}"],
        ["data.train_file: could not read", "JSON parse error"]),
    "json of columns (pandas' default to_json)": lambda t, b, base: (
        [*base, f"data.train_file={toy_rows(40).to_json(t / 'cols.json') or t / 'cols.json'}"],
        ["holds one JSON object", "to_json(orient='records')"]),
    "json of rows without names (to_json(orient='values'))": lambda t, b, base: (
        [*base, f"data.train_file={toy_rows(40).to_json(t / 'vals.json', orient='values') or t / 'vals.json'}"],
        ["holds a JSON array of arrays", "orient='records'"]),
    "list texts (words, not a string)": lambda t, b, base: (
        [*base, f"data.train_file={list_texts(t)}"],
        ["data.train_file: 20 rows have a list or mapping in text column 'text'", "join the parts"]),
    "a column named twice": lambda t, b, base: (
        [*base, f"data.train_file={write(t / 'twice.csv', TWICE)}"],
        ["data.train_file", "column 'label' is named twice in the header"]),
    "the label column as the text": lambda t, b, base: (
        [*base, "data.text_column=label"], ["data.text_column: 'label' is also data.label_column"]),
    "a sweep value the model refuses": lambda t, b, base: (
        [*base, "sweep.space={freeze.k: {choices: [1, 9]}}", "methods=freeze"],
        ["sweep.space.freeze.k: 9: freeze.k: 9 is more than the 2 transformer blocks"]),
    # written as a bare list or without an end: a traceback (the option checks read every entry)
    "a search space entry as a bare list": lambda t, b, base: (
        [*base, "sweep.space={lora.r: [4, 8], train.batch_size: [4, 8]}", "methods=lora"],
        ["sweep.space.lora.r: expected {low, high[, log]} or {choices: [...]}, got [4, 8]",
         "sweep.space.train.batch_size: expected"]),
    # transformers applies adapter files it finds beside a model's weights as it loads the folder
    "a model folder holding adapter files": case_model_folder_with_adapter,
    "an adapter folder for a model": lambda t, b, base: case_model_folder_with_adapter(t, b, base, weights=False),
    "a tokenizer with more tokens than the model's embeddings": case_tokenizer_larger_than_the_model,
    "a model that needs its own code (trust_remote_code)": case_model_with_custom_code,
    # keys of a dataset folder or hub id, given where nothing reads them: ignored, a run on other data than asked
    "a dataset's split name beside data.train_file": lambda t, b, base: (
        [*base, "data.test_split=heldout", "data.dataset_config=en"],
        ["data.test_split: 'heldout' is not used: data.train_file's files are the data", "data.dataset_config: 'en'"]),
    "a revision for a local model folder": lambda t, b, base: (
        [*base, "model.revision=v2.0"], ["model.revision: 'v2.0': a revision is a hub id's branch, tag or commit, and",
                                         "is a local folder; unset it"]),
    "more virtual tokens than the model has positions": lambda t, b, base: (
        [*base, "methods=prompt-tuning", "prompt-tuning.num_virtual_tokens=60"],
        ["exceeds the model's 64 positions; use at most 32 virtual tokens"]),  # (not: lower max_length to 4)
    "all-linear beside module names": lambda t, b, base: (
        [*base, "methods=lora", "lora.target_modules=[all-linear, query]"],
        ["lora.target_modules: 'all-linear' stands alone"]),
    "a checkpoint with fewer blocks than its config": case_checkpoint_short_of_its_config,
    "a search range without its high end": lambda t, b, base: (
        [*base, "sweep.space={lora.r: {low: 2}}", "methods=lora"], ["sweep.space.lora.r: expected {low, high"]),
}


def relabel(frame, label):
    frame["label"] = label
    return frame


def list_labels(tmp: Path) -> Path:
    frame = toy_rows(20)
    frame["label"] = [[label] for label in frame["label"]]
    frame.to_json(tmp / "multi.jsonl", orient="records", lines=True)
    return tmp / "multi.jsonl"


def list_texts(tmp: Path) -> Path:
    frame = toy_rows(20)
    frame["text"] = [text.split() for text in frame["text"]]
    frame.to_json(tmp / "words.jsonl", orient="records", lines=True)
    return tmp / "words.jsonl"


def blank_texts(frame):
    frame.loc[3, "text"] = "   "
    return frame


def no_tokenizer(tmp: Path, bert: Path) -> Path:
    folder = tmp / "no-tok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert / name, folder / name)
    return folder


def tokenless(tmp: Path, bert: Path) -> Path:
    """The model with a tokenizer that turns every text into nothing (as a wrong tokenizer without special
    tokens can): training would crash on empty rows, or learn from virtual tokens alone."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp / "tokenless"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert / name, folder / name)
    tokenizer = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return folder


def no_weights(tmp: Path, bert: Path) -> Path:
    folder = tmp / "no-weights"
    shutil.copytree(bert, folder)
    (folder / "model.safetensors").unlink()
    return folder


def renamed_weights(tmp: Path, bert: Path) -> Path:
    """A BERT config over tensors under other names (as if saved from another architecture)."""
    from safetensors.torch import load_file, save_file

    folder = tmp / "renamed"
    shutil.copytree(bert, folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({f"encoder_model.{k}": v for k, v in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


@pytest.fixture
def base_args(tiny_bert, toy_data):
    return [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}", "data.max_length=32",
            "train.batch_size=8"]


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_a_clear_message(case, tmp_path, tiny_bert, base_args, capsys):
    items, fragments = CASES[case](tmp_path, tiny_bert, base_args)
    out_dir = tmp_path / "out"
    code = main(["compare", *items, "--output", str(out_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert all(line.startswith("error: ") for line in err.strip().splitlines())
    assert not out_dir.exists()
    # `validate` is the check before a long run: it must find the same problem
    assert main(["validate", *items]) == 2
    validated = capsys.readouterr().err
    assert all(fragment in validated for fragment in fragments), validated


def test_csv_with_embedded_newlines_and_quotes_loads(tmp_path, tiny_bert):
    frame = toy_rows(40)
    frame.loc[0, "text"] = 'a "quoted" good\nreview, with a comma'
    frame.loc[1, "text"] = "line one\nline two bad"
    path = write(tmp_path / "q.csv", frame)
    from tunelab import validate

    job = validate(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={path}", "data.max_length=32",
                          "train.batch_size=4"])
    assert len(job.train) + len(job.validation) == 40
    assert 'a "quoted" good\nreview, with a comma' in set(job.data.frames["train"].text) | set(job.data.frames["validation"].text)


def test_non_empty_output_is_refused_without_overwrite(tmp_path, base_args, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["compare", *base_args, "--output", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace its results, or --resume to continue the experiment there" in err
    for command in ("compare", "sweep"):  # both: --overwrite was silently ignored
        assert main([command, "--resume", "--overwrite", "--output", str(tmp_path)]) == 2
        assert "--overwrite: with --resume, which continues what --output holds; drop one" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").is_file()


def test_several_problems_are_reported_together(base_args, tmp_path, capsys):
    # config problems all together first; once the config is sound, model and data problems all together
    code = main(["validate", *base_args, "train.lr=0", "methods=ful", "train.epochs=x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 3
    code = main(["validate", *base_args, f"data.train_file={tmp_path}/x.csv", "data.max_length=1000",
                 "methods=lora", "lora.target_modules=nothing"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 3, err


def test_every_missing_column_of_every_file_is_reported_at_once(tmp_path, base_args, capsys):
    frame = toy_rows(20).rename(columns={"text": "review", "label": "stars"})
    train, test = write(tmp_path / "train.csv", frame), write(tmp_path / "test.csv", frame)
    assert main(["validate", *base_args, f"data.train_file={train}", f"data.test_file={test}",
                 "data.label_column=label"]) == 2
    err = capsys.readouterr().err
    for key, column in (("text_column", "text"), ("label_column", "label")):
        for split in ("train", "test"):
            assert f"error: data.{key}: column '{column}' not in data.{split}_file; columns are: review, stars" in err
    assert err.count("error: ") == 4, err


def test_process_exit_code_and_no_traceback_from_the_real_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tunelab.cli", "validate", "methods=prompt_tuning"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "did you mean 'prompt-tuning'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA device")
def test_cuda_asked_for_on_a_machine_without_one(tmp_path, base_args, capsys):
    assert main(["validate", *base_args, "train.device=cuda"]) == 2
    assert "error: train.device: 'cuda', but torch finds no CUDA device" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--device", "cuda", "--text", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device: 'cuda', but torch finds no CUDA device") and "Traceback" not in err


def tiny_gpt2(tmp: Path, llama: Path) -> Path:
    """A causal LM whose positions are a learned table of 64 (GPT-2), with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(llama)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp / "gpt2")
    tokenizer.save_pretrained(tmp / "gpt2")
    return tmp / "gpt2"


def test_answers_that_would_run_past_a_position_table_are_refused_before_training(tiny_causal_overrides, tiny_llama,
                                                                                  tmp_path, capsys):
    """64 learned positions; prompts reach 31 tokens at data.max_length=32: 33 new tokens fit, 40 would fail with
    an IndexError mid-run. A rotary model (the tiny Llama, also 64) only runs past its nominal length: allowed."""
    gpt2 = [*tiny_causal_overrides, f"model.name_or_path={tiny_gpt2(tmp_path, tiny_llama)}", "methods=lora"]
    assert main(["validate", *gpt2, "causal-lm.max_new_tokens=40"]) == 2
    assert ("causal-lm.max_new_tokens: a prompt of up to 31 tokens + 40 generated tokens exceeds the model's 64 "
            "positions; lower causal-lm.max_new_tokens to 33 or data.max_length to 25 (rows whose prompt no longer "
            "fits are dropped)") in capsys.readouterr().err
    assert main(["validate", *gpt2, "causal-lm.max_new_tokens=60"]) == 2  # a max_length of 5 is not suggested
    assert "lower causal-lm.max_new_tokens to 33\n" in capsys.readouterr().err
    assert main(["validate", *gpt2, "causal-lm.max_new_tokens=33"]) == 0
    # prompt tuning's virtual tokens come before the prompt in generation too
    assert main(["validate", *gpt2, "methods=prompt-tuning", "causal-lm.max_new_tokens=33"]) == 2
    assert "+ 20 virtual tokens (prompt-tuning) + 33 generated tokens" in capsys.readouterr().err
    assert main(["validate", *tiny_causal_overrides, "methods=lora", "causal-lm.max_new_tokens=40"]) == 0


def test_seeds_past_the_largest_seed_are_refused_before_any_run(tmp_path, base_args, capsys):
    """The first seed trained and wrote its results before the second failed on a seed nobody wrote."""
    out_dir = tmp_path / "out"
    code = main(["compare", *base_args, "train.seed=4294967295", "--seeds", "2", "--output", str(out_dir),
                 "--no-progress", "--in-process"])
    assert code == 2 and not out_dir.exists()
    assert ("--seeds: 2 seeds from train.seed 4294967295 run to 4294967296, past the largest seed 4294967295; "
            "lower train.seed to at most 4294967294") in capsys.readouterr().err
