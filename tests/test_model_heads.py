"""Heads beyond `classifier`: every module beside the pretrained backbone is the task's fresh head, trained in full
by every method (peft: modules_to_save), so DistilBERT-, RoBERTa- and BART-style classifiers train."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunelab import validate
from tunelab.config import load_config
from tunelab.experiment.job import prepare_job
from tunelab.experiment.runner import setup_method
from tunelab.tasks.base import registry as task_registry

from conftest import VOCAB


def build_tiny_distilbert(folder: Path) -> Path:
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel

    folder.mkdir(parents=True, exist_ok=True)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}).save_pretrained(folder)
    config = DistilBertConfig(vocab_size=len(VOCAB), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(folder)  # backbone only: pre_classifier and classifier are new
    return folder


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory) -> Path:
    return build_tiny_distilbert(tmp_path_factory.mktemp("tiny-distilbert"))


def overrides(model: Path, toy_data, method: str) -> list[str]:
    return [f"model.name_or_path={model}", f"data.train_file={toy_data['train']}",
            f"data.validation_file={toy_data['validation']}", "data.max_length=32", "train.batch_size=8",
            f"methods={method}", f"{method}.target_modules=[q_lin,v_lin]" if method == "lora" else "train.seed=1"]


def test_the_head_is_everything_beside_the_backbone(tiny_distilbert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_distilbert, num_labels=2)
    assert task_registry()["classification"].head_modules(model) == ("pre_classifier", "classifier")


def test_validate_accepts_a_backbone_whose_head_has_extra_layers(tiny_distilbert, toy_data):
    summary = validate(overrides=overrides(tiny_distilbert, toy_data, "lora")).summary()
    assert summary["train_rows"] == 160


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "p-tuning", "bitfit", "full"])
def test_every_head_layer_trains_and_its_count_matches(method, tiny_distilbert, toy_data):
    job = prepare_job(load_config(None, overrides(tiny_distilbert, toy_data, method)))
    setup = setup_method(job, method)
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert any("pre_classifier" in n for n in trainable) and any(".classifier." in n or n.startswith("classifier")
                                                                 for n in trainable)
    assert sum(p.numel() for p in setup.model.parameters() if p.requires_grad) == setup.expected_trainable


def test_lora_says_when_peft_has_no_default_targets(tiny_distilbert, toy_data):
    from tunelab.errors import TunelabInputError

    with pytest.raises(TunelabInputError, match="no default for model type 'distilbert'.*q_lin"):
        validate(overrides=overrides(tiny_distilbert, toy_data, "lora")[:-1])


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "ia3"])
def test_gpt2s_conv1d_layers_are_linear_layers_for_the_adapters(method, tmp_path, tiny_llama, tiny_causal_overrides):
    """GPT-2 keeps its linear layers as transformers' Conv1D (weight stored in × out): peft adapts them, so the
    adapters must find them (they were refused: "'c_attn' matches no linear layer") and count them right."""
    from test_bad_input import tiny_gpt2

    overrides = [*tiny_causal_overrides, f"model.name_or_path={tiny_gpt2(tmp_path, tiny_llama)}", f"methods={method}"]
    job = prepare_job(load_config(None, overrides))
    setup = setup_method(job, method)
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    assert trainable == setup.expected_trainable > 0


ROBERTA_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=66, pad_token_id=0, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def build_tiny_encoder(folder: Path, config_class, model_class, pooler: bool = False, **sizes) -> Path:
    """A tiny random backbone of another architecture, with the toy word-level tokenizer; without its pooler
    unless its classifier reads one (ALBERT's does)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}).save_pretrained(folder)
    torch.manual_seed(0)
    model_class(config_class(vocab_size=len(VOCAB), **sizes), **({} if pooler else {"add_pooling_layer": False})
                ).save_pretrained(folder)
    return folder


def build_tiny_xlm_roberta(folder: Path) -> Path:
    """XLM-RoBERTa's classifier is registered before its backbone: what sits above the blocks is not what
    comes after them in registration order."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    return build_tiny_encoder(folder, XLMRobertaConfig, XLMRobertaModel, **ROBERTA_SIZES)


@pytest.mark.parametrize("extra", [["freeze.k=0"], ["freeze.k=1"], []])
def test_a_head_registered_before_the_backbone_trains_with_freeze_and_llrd(extra, tmp_path, toy_data):
    model = build_tiny_xlm_roberta(tmp_path / "xlmr")
    for method in ("freeze", "llrd"):
        job = prepare_job(load_config(None, [*overrides(model, toy_data, method), *(extra if method == "freeze" else [])]))
        setup = setup_method(job, method)
        trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
        assert any("classifier" in n for n in trainable), method
        assert sum(p.numel() for p in setup.model.parameters() if p.requires_grad) == setup.expected_trainable
        if method == "llrd":  # the head trains at the base rate, not the embeddings' most decayed one
            head = setup.model.classifier.dense.weight
            group = next(g for g in setup.optimizer.param_groups if any(p is head for p in g["params"]))
            assert group["name"] == "head" and group["lr"] == max(g["lr"] for g in setup.optimizer.param_groups)


def build_tiny_albert(folder: Path) -> Path:
    """ALBERT's embeddings (16 wide) are narrower than its hidden size (32), as ELECTRA's can be."""
    from transformers import AlbertConfig, AlbertModel

    return build_tiny_encoder(folder, AlbertConfig, AlbertModel, pooler=True, embedding_size=16, hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              classifier_dropout_prob=0.0)


@pytest.mark.parametrize("method, extra", [("prompt-tuning", []), ("prompt-tuning", ["prompt-tuning.init=random"]),
                                           ("p-tuning", [])])
def test_virtual_tokens_are_as_wide_as_the_input_embeddings(method, extra, tmp_path, toy_data):
    model = build_tiny_albert(tmp_path / "albert")
    job = prepare_job(load_config(None, [*overrides(model, toy_data, method), *extra, "train.max_steps=2"]))
    setup = setup_method(job, method)
    assert sum(p.numel() for p in setup.model.parameters() if p.requires_grad) == setup.expected_trainable
    # the virtual tokens join 16-wide embeddings (sized by the hidden size, random-init ones failed here)
    setup.model(input_ids=torch.tensor([[2, 5, 3]]), labels=torch.tensor([1])).loss.backward()


def build_tiny_roberta(folder: Path) -> Path:
    from transformers import RobertaConfig, RobertaModel

    return build_tiny_encoder(folder, RobertaConfig, RobertaModel, **ROBERTA_SIZES)


@pytest.mark.parametrize("method", ["ia3", "lora"])
def test_a_head_of_several_layers_merges(method, tmp_path, toy_data):
    """RoBERTa's head is a module of two layers (RobertaClassificationHead): peft's IA3 unload failed on it
    ("has no attribute 'weight'"); merged, plain transformers gives the adapter's logits."""
    import tunelab
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.use.artifact import find_artifact, load_artifact

    out = tmp_path / "run"
    args = [*overrides(build_tiny_roberta(tmp_path / "roberta"), toy_data, method)[:-1], "train.max_steps=3",
            "train.eval_every_steps=0", "train.precision=fp32"]
    assert tunelab.compare(overrides=args, output_dir=out, show_progress=False, isolate=False).exit_code == 0
    merged = tunelab.export(out, tmp_path / "merged", merge=True)
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    adapter, _ = load_artifact(find_artifact(out))
    batch = AutoTokenizer.from_pretrained(merged)(["the tea was lovely", "stale box"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, adapter(**batch).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adapter", ["prompt-tuning", "p-tuning", "lora"])
def test_a_decoder_classifier_answers_a_row_the_same_alone_or_in_a_padded_batch(adapter, tiny_llama):
    """Decoder classifiers pool their last real token, found in input_ids; prompt tuning and p-tuning pass
    embeddings instead, and the classifier read a padding position of every shorter row."""
    from peft import LoraConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    from tunelab.methods._peft import pooled_at_last_real_token

    torch.manual_seed(0)
    base = LlamaForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)
    config = {"prompt-tuning": PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
              "p-tuning": PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=16),
              "lora": LoraConfig(task_type="SEQ_CLS", r=2)}[adapter]
    model = pooled_at_last_real_token(get_peft_model(base, config)).eval()
    short, long = [2, 8, 9], [2, 8, 9, 10, 11, 12, 13]
    batch = torch.tensor([short + [0] * 4, long])
    mask = torch.tensor([[1] * 3 + [0] * 4, [1] * 7])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
        together = model(input_ids=batch, attention_mask=mask).logits
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-5)


def test_a_classifier_checkpoint_with_other_labels_gets_a_fresh_head_and_keeps_its_backbone(tiny_bert, tmp_path):
    """A fine-tuned 5-class classifier as the start of a 3-class task: transformers refuses the head's shapes
    unless told to replace it; the backbone must still come from the checkpoint, never at random."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.loading import load_pretrained, skeleton

    five = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=5)
    five.save_pretrained(tmp_path / "five")
    task = task_registry()["classification"]
    three = load_pretrained(str(tmp_path / "five"), task, {"labels": ["a", "b", "c"]})
    assert three.classifier.weight.shape[0] == 3 and three.config.num_labels == 3
    torch.testing.assert_close(three.bert.embeddings.word_embeddings.weight, five.bert.embeddings.word_embeddings.weight)
    assert skeleton(str(tmp_path / "five"), task, {"labels": ["a", "b", "c"]})[1] == []


def test_a_classifier_head_of_the_same_size_is_kept_only_for_the_same_labels_in_the_same_order(tiny_bert, tmp_path):
    """A neg/pos checkpoint started a pos/neg run with its head: every row meant the other class."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.loading import load_pretrained

    saved = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, id2label={0: "neg", 1: "pos"})
    saved.save_pretrained(tmp_path / "negpos")
    task = task_registry()["classification"]
    same = load_pretrained(str(tmp_path / "negpos"), task, {"labels": ["neg", "pos"]})
    torch.testing.assert_close(same.classifier.weight, saved.classifier.weight)  # continued as trained
    for labels in (["pos", "neg"], ["bad", "good"]):
        other = load_pretrained(str(tmp_path / "negpos"), task, {"labels": labels})
        assert not torch.equal(other.classifier.weight, saved.classifier.weight), labels
        assert other.config.id2label == dict(enumerate(labels))
        torch.testing.assert_close(other.bert.pooler.dense.weight, saved.bert.pooler.dense.weight)
    # a checkpoint that named no labels (transformers' LABEL_0, LABEL_1) keeps its head by position
    unnamed = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    unnamed.save_pretrained(tmp_path / "unnamed")
    kept = load_pretrained(str(tmp_path / "unnamed"), task, {"labels": ["0", "1"]})
    torch.testing.assert_close(kept.classifier.weight, unnamed.classifier.weight)


def test_a_decoder_classifier_without_a_pad_id_in_its_config_pads_as_its_tokenizer_does(tiny_llama, toy_data,
                                                                                         tmp_path):
    """Many decoder checkpoints name a pad token in their tokenizer only. The classifier finds each row's last
    real token by the config's pad id; set to the end-of-text id, it missed the tokenizer's padding and read a
    padding position: a row's scores depended on the rows batched with it, in training, evaluation and predict."""
    import json
    import shutil

    folder = shutil.copytree(tiny_llama, tmp_path / "no-pad-id")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    job = prepare_job(load_config(None, overrides(folder, toy_data, "full")))
    model = setup_method(job, "full").model.eval()
    pad = job.tokenizer.pad_token_id
    assert model.config.pad_token_id == pad != config["eos_token_id"]
    short, long = [2, 8, 9], [2, 8, 9, 10, 11, 12, 13]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
        together = model(input_ids=torch.tensor([short + [pad] * 4, long]),
                         attention_mask=torch.tensor([[1] * 3 + [0] * 4, [1] * 7])).logits
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-5)


def build_tiny_masked_lm_bert(folder: Path) -> Path:
    """A checkpoint saved from BertForMaskedLM (as after domain-adaptive pretraining): the encoder without the
    pooler BERT's classifier reads."""
    from transformers import BertConfig, BertForMaskedLM

    return build_tiny_encoder(folder, BertConfig, BertForMaskedLM, pooler=True, hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=64)


def masked_lm_overrides(model: Path, toy_data, methods: str) -> list[str]:
    return [f"model.name_or_path={model}", f"data.train_file={toy_data['train']}",
            f"data.validation_file={toy_data['validation']}", f"data.test_file={toy_data['test']}",
            "data.max_length=32", "train.batch_size=8", f"methods={methods}", "train.precision=fp32"]


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "ia3", "bitfit", "freeze", "llrd"])
def test_a_pooler_the_checkpoint_lacks_trains_with_the_head(method, tmp_path, toy_data):
    """Every method trains it: left random under a frozen backbone it would scramble what adapters learn."""
    model = build_tiny_masked_lm_bert(tmp_path / "mlm")
    job = prepare_job(load_config(None, masked_lm_overrides(model, toy_data, method)))
    setup = setup_method(job, method)
    pooler = sum(p.numel() for n, p in setup.model.named_parameters() if p.requires_grad and ".pooler." in n)
    assert pooler == 32 * 32 + 32  # its dense layer, once (peft's trained copy, not the frozen original)
    assert sum(p.numel() for p in setup.model.parameters() if p.requires_grad) == setup.expected_trainable


def test_a_masked_lm_checkpoint_trains_and_its_artifacts_predict_what_the_runs_scored(tmp_path, toy_data):
    import json

    import tunelab
    from tunelab.cli import main

    model = build_tiny_masked_lm_bert(tmp_path / "mlm")
    out = tmp_path / "exp"
    outcome = tunelab.compare(overrides=[*masked_lm_overrides(model, toy_data, "lora,prompt-tuning,bitfit"),
                                         "train.max_steps=6", "train.eval_every_steps=0"],
                              output_dir=out, show_progress=False, isolate=False)
    assert [r["status"] for r in outcome.records] == ["success"] * 3
    for record in outcome.records:  # the pooler trained in the run is the one the artifact brings back
        predictions = tmp_path / f"{record['method']}.jsonl"
        assert main(["predict", str(out), "--method", record["method"], "--input", str(toy_data["test"]),
                     "--output", str(predictions)]) == 0
        labels = [json.loads(line)["label"] for line in predictions.read_text().splitlines()]
        assert [["neg", "pos"].index(label) for label in labels] == record["test_per_example"]["pred"]


@pytest.mark.parametrize("method", ["lora", "prompt-tuning"])
def test_an_estimate_counts_the_missing_pooler_as_trained(method, tmp_path, toy_data, tiny_bert):
    """estimate builds the model from its config: the checkpoint's tensor names say the pooler is new."""
    from tunelab.estimate import builder, on_skeleton
    from tunelab.models.loading import checkpoint_lacks_poolers, read_model_config

    model = build_tiny_masked_lm_bert(tmp_path / "mlm")
    assert checkpoint_lacks_poolers(str(model)) and not checkpoint_lacks_poolers(str(tiny_bert))
    cfg = load_config(None, masked_lm_overrides(model, toy_data, method))
    config = read_model_config(str(model))
    for key, value in cfg.task_spec.model_kwargs({}).items():
        setattr(config, key, value)
    chosen, opts, skeleton, ctx = on_skeleton(method, cfg, str(model), builder(cfg.task_spec, config, True))
    trained = setup_method(prepare_job(cfg), method).expected_trainable
    assert chosen.expected_trainable_params(skeleton, opts, ctx) == trained
