"""The last block trains on the row the head reads: same loss and gradients, found without naming a model."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from tunelab.config import load_config
from tunelab.experiment.job import prepare_job
from tunelab.experiment.runner import setup_method
from tunelab.train.head_row import HeadRowOnly
from tunelab.train.loop import TrainingLoop, Validation

SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CUTS = {  # architecture -> (config, where the cut is found, the module after it that must see one row)
    "bert": (lambda: tf.BertConfig(**SMALL), "attention.output", "intermediate"),
    "roberta": (lambda: tf.RobertaConfig(**SMALL, pad_token_id=1), "attention.output", "intermediate"),
    "deberta-v2": (lambda: tf.DebertaV2Config(**SMALL), "attention.output", "intermediate"),
    "distilbert": (lambda: tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=120,
                                               num_labels=3, dropout=0.0, attention_dropout=0.0,
                                               seq_classif_dropout=0.0), "sa_layer_norm", "ffn"),
}


def classifier(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForSequenceClassification.from_config(config)


def last_block(model) -> torch.nn.Module:
    from tunelab.models.structure import find_block_list
    return find_block_list(model)[1][-1]


def loss_and_gradients(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(CUTS))
def test_training_cuts_the_last_block_to_the_first_row_with_the_same_loss_and_gradients(arch):
    make_config, cut_name, after = CUTS[arch]
    model = classifier(make_config())
    head_row = HeadRowOnly.for_model(model)
    # earlier modules of the block (its attention, whose cut would attend to one key) were tried and refused
    assert head_row.cut_name == cut_name
    rows_seen = []
    last_block(model).get_submodule(after).register_forward_pre_hook(lambda _m, a: rows_seen.append(a[0].shape[1]))
    ids = torch.randint(3, 120, (4, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    whole_loss, whole_grads = loss_and_gradients(model, ids, mask, labels)
    with head_row.active():
        cut_loss, cut_grads = loss_and_gradients(model, ids, mask, labels)
        model.eval()
        with torch.no_grad():
            cut_eval = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        whole_eval = model(input_ids=ids, attention_mask=mask).logits
    assert rows_seen == [11, 1, 11, 11]  # training whole, training cut, evaluation (not cut) twice
    assert torch.allclose(cut_loss, whole_loss, rtol=1e-6, atol=1e-7)
    assert cut_grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        assert torch.allclose(cut_grads[name], grad, rtol=1e-5, atol=1e-7), name
    assert torch.equal(cut_eval, whole_eval)


def tiny_llama_lm():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64))


class MeanPooled(torch.nn.Module):
    """A head that reads every row: the mean of the last hidden states."""

    def __init__(self):
        super().__init__()
        self.encoder = tf.BertModel(tf.BertConfig(**SMALL), add_pooling_layer=False)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, input_ids, attention_mask):
        return (self.head(self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                          .mean(dim=1)),)


@pytest.mark.parametrize("case", ["gpt2 reads its last token", "albert shares one block", "causal lm",
                                  "mean pooling", "turned off"])
def test_it_stays_off_where_the_head_reads_other_rows_or_a_block_runs_twice(case):
    model = {
        "gpt2 reads its last token": lambda: classifier(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=120,
                                                                      num_labels=3, pad_token_id=0)),
        "albert shares one block": lambda: classifier(tf.AlbertConfig(**SMALL, embedding_size=16)),
        "causal lm": tiny_llama_lm,
        "mean pooling": MeanPooled,
        "turned off": lambda: classifier(tf.BertConfig(**SMALL)),
    }[case]()
    head_row = HeadRowOnly.for_model(model, enabled=case != "turned off")
    assert head_row.cut_at is None
    modes = [m.training for m in model.modules()]
    with head_row.active():
        pass
    assert modes == [m.training for m in model.modules()]  # the check left every module's mode as it was


@pytest.mark.parametrize("method,precision", [("full", "fp32"), ("lora", "bf16"), ("prompt-tuning", "fp32")])
def test_the_loop_trains_on_the_cut_and_evaluates_whole(tiny_overrides, method, precision):
    """Through the loop: also with LoRA's frozen weights stored in bf16, which the check must run under."""
    job = prepare_job(load_config(None, [*tiny_overrides, f"methods={method}", "train.max_steps=2",
                                         "train.eval_every_steps=1", f"train.precision={precision}"]))
    setup = setup_method(job, method)

    def evaluate(model):  # as a task evaluates: eval mode, here on 5 tokens
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.full((2, 5), 5), attention_mask=torch.ones(2, 5, dtype=torch.long))
        model.train()
        return {"accuracy": 0.5}
    loop = TrainingLoop(setup.model, setup.optimizer, setup.scheduler, setup.accelerator, job.config.train,
                        job.train, Validation(evaluate, "accuracy", True))
    assert loop.head_row.cut_name == "attention.output"
    shortcuts = loop.shortcuts()  # what the result record says
    assert loop.module.get_submodule(shortcuts["head_row_only_from"]) is loop.head_row.cut_at
    assert shortcuts["embedding_gradient_rows_only"] == (method == "full")
    assert shortcuts["cheaper_cpu_dropout"]
    rows_seen = {True: set(), False: set()}
    intermediate = last_block(loop.module).get_submodule("intermediate")
    intermediate.register_forward_pre_hook(lambda m, a: rows_seen[m.training].add(a[0].shape[1]))
    loop.run()
    assert rows_seen == {True: {1}, False: {5 + virtual_tokens(job, method)}}


def virtual_tokens(job, method: str) -> int:
    return job.config.options(method).num_virtual_tokens if method == "prompt-tuning" else 0
