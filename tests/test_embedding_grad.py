"""The kept, sparsely filled input-embedding gradient changes how a CPU step allocates, not what it computes."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tunelab.config import load_config
from tunelab.experiment.job import prepare_job
from tunelab.experiment.runner import setup_method
from tunelab.train import embedding_grad
from tunelab.train.embedding_grad import KeptEmbeddingGradient
from tunelab.train.loop import TrainingLoop, Validation

CPU = torch.device("cpu")


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def embedding_gradients(model, batches, kept: KeptEmbeddingGradient | None) -> list[torch.Tensor]:
    weight = model.get_input_embeddings().weight
    found = []
    for ids in batches:
        if kept is not None:
            kept.zero()
        model(input_ids=ids, labels=torch.zeros(len(ids), dtype=torch.long)).loss.backward()
        found.append(weight.grad.clone())
        model.zero_grad(set_to_none=True)
    return found


def test_the_gradient_is_the_dense_one_bit_for_bit_in_a_buffer_kept_across_steps():
    generator = torch.Generator().manual_seed(1)
    # repeated tokens and padding (id 0, the embedding's padding row) in every batch
    batches = [torch.randint(0, 40, (4, 12), generator=generator) for _ in range(3)]
    model = tiny_bert()
    dense = embedding_gradients(model, batches, None)
    kept = KeptEmbeddingGradient.for_model(model, CPU, 1)
    embedding = model.get_input_embeddings()
    assert kept.embedding is embedding
    buffers = []
    with kept.active():
        assert embedding.sparse
        for ids, expected in zip(batches, dense):
            sparse = embedding_gradients(model, [ids], kept)[0]
            assert torch.equal(sparse, expected) and sparse.layout == torch.strided
            buffers.append(kept.buffer.data_ptr())
    assert len(set(buffers)) == 1  # one buffer, zeroed in place
    assert not embedding.sparse and kept.buffer is None
    assert torch.count_nonzero(dense[0][0]) == 0  # the padding row gets no gradient, either way


@pytest.mark.parametrize("case", ["frozen", "two processes", "cuda", "not an nn.Embedding"])
def test_it_stays_out_where_it_does_not_apply(case):
    model = tiny_bert()
    device, processes = (torch.device("cuda") if case == "cuda" else CPU), 2 if case == "two processes" else 1
    if case == "frozen":
        model.get_input_embeddings().weight.requires_grad_(False)
    if case == "not an nn.Embedding":
        model.get_input_embeddings = lambda: torch.nn.Linear(2, 2)
    kept = KeptEmbeddingGradient.for_model(model, device, processes)
    assert kept.embedding is None
    with kept.active():
        kept.zero()
    assert model.bert.embeddings.word_embeddings.weight.grad is None


def trained_weights(tiny_overrides, keep: bool, monkeypatch, micro_batches: int) -> dict[str, torch.Tensor]:
    if not keep:
        monkeypatch.setattr(embedding_grad.KeptEmbeddingGradient, "for_model",
                            classmethod(lambda cls, model, device, processes, enabled=True: cls(None)))
    job = prepare_job(load_config(None, [*tiny_overrides, "methods=full", "train.max_steps=4",
                                         "train.eval_every_steps=0",
                                         f"train.gradient_accumulation_steps={micro_batches}"]))
    setup = setup_method(job, "full")
    loop = TrainingLoop(setup.model, setup.optimizer, setup.scheduler, setup.accelerator, job.config.train,
                        job.train, Validation(lambda model: {"accuracy": 0.5}, "accuracy", True))
    assert (loop.embedding_grad.embedding is not None) == keep
    loop.run()
    monkeypatch.undo()
    return {k: v.detach().clone() for k, v in setup.model.state_dict().items()}


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_loop_trains_the_same_weights_with_it(tiny_overrides, monkeypatch, micro_batches):
    """Whole batches: the same weights, bit for bit. With micro-batches a later one's rows are added into the
    running sum one by one, where the dense path sums them first: the same up to rounding (2e-10 on an AMD
    EPYC Zen 4; bit for bit on an AMX Xeon)."""
    dense = trained_weights(tiny_overrides, False, monkeypatch, micro_batches)
    kept = trained_weights(tiny_overrides, True, monkeypatch, micro_batches)
    for name, value in dense.items():
        if micro_batches == 1:
            assert torch.equal(kept[name], value), name
        else:
            assert torch.allclose(kept[name], value, rtol=1e-6, atol=1e-8), name
