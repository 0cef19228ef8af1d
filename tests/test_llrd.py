"""LLRD: every parameter's optimizer learning rate is lr * decay^(distance of its layer from the head)."""
from __future__ import annotations

import pytest

from tunelab.config import load_config
from tunelab.experiment.job import prepare_job
from tunelab.methods.llrd import layer_depths
from tunelab.experiment.runner import setup_method


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_group_learning_rates_follow_depth(decay, tiny_overrides):
    lr = 1e-3
    job = prepare_job(load_config(None, [*tiny_overrides, "methods=llrd", f"llrd.decay={decay}",
                                         f"llrd.lr={lr}"]))
    setup = setup_method(job, "llrd")
    model = setup.accelerator.unwrap_model(setup.model)
    lr_of = {id(p): g["initial_lr"] for g in setup.optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    expected = {
        "classifier.weight": lr,                                  # head: the base rate
        "bert.pooler.dense.weight": lr,                           # after the blocks: trained with the head
        "bert.encoder.layer.1.attention.self.query.weight": lr * decay,       # top block
        "bert.encoder.layer.0.output.dense.weight": lr * decay ** 2,
        "bert.encoder.layer.0.output.LayerNorm.bias": lr * decay ** 2,
        "bert.embeddings.word_embeddings.weight": lr * decay ** 3,          # embeddings lowest
    }
    for name, want in expected.items():
        assert lr_of[id(names[name])] == pytest.approx(want, rel=1e-12), name
    assert len(lr_of) == len(names)  # every parameter is in exactly one group
    recorded = {g["name"]: g["lr"] for g in setup.param_groups}
    assert recorded["embeddings"] == pytest.approx(lr * decay ** 3) and recorded["head"] == lr


def test_no_decay_for_biases_and_norms(tiny_overrides):
    job = prepare_job(load_config(None, [*tiny_overrides, "methods=llrd"]))
    setup = setup_method(job, "llrd")
    for group in setup.optimizer.param_groups:
        assert (group["weight_decay"] == 0) == group["name"].endswith("no_decay")


def test_layer_discovery_is_generic_for_decoder_models():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=3, num_attention_heads=2,
                                                       num_key_value_heads=2, num_labels=2))
    depths, blocks = layer_depths(model)
    assert blocks == 3
    assert depths["model.embed_tokens.weight"] == 0
    assert depths["model.layers.2.mlp.up_proj.weight"] == 3
    assert depths["model.norm.weight"] == 4 and depths["score.weight"] == 4


def test_a_relative_position_table_after_the_blocks_is_an_embedding():
    """DeBERTa registers its relative-position table (used by every block) after the block stack: it trains at
    the embeddings' rate, not the head's; the pooler and classifier stay at the head's."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    model = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        relative_attention=True, position_buckets=8, max_relative_positions=16, num_labels=2))
    depths, blocks = layer_depths(model)
    assert blocks == 2
    assert depths["deberta.embeddings.word_embeddings.weight"] == 0
    assert depths["deberta.encoder.rel_embeddings.weight"] == 0
    assert depths["deberta.encoder.layer.1.output.dense.weight"] == 2
    assert depths["pooler.dense.weight"] == 3 and depths["classifier.weight"] == 3


def test_a_final_norm_registered_before_the_blocks_is_still_after_them():
    """OPT registers `final_layer_norm` before its layers: where the forward runs it decides, so it trains at
    the head's rate (and with freeze's top), not at the embeddings'."""
    from transformers import OPTConfig, OPTForCausalLM

    from tunelab.methods.freeze import after_stack

    model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=8))
    depths, blocks = layer_depths(model)
    assert depths["model.decoder.final_layer_norm.weight"] == blocks + 1
    assert depths["model.decoder.project_out.weight"] == blocks + 1  # runs after the blocks too
    assert depths["model.decoder.project_in.weight"] == 0 and depths["model.decoder.embed_tokens.weight"] == 0
    assert {name for name, _ in after_stack(model, "model.decoder.layers")} == {
        "model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias",
        "model.decoder.project_out.weight"}
    assert model.training  # the trace ran in eval mode and left the modes as they were


def test_blocks_in_nested_lists_are_refused_by_the_methods_that_order_them():
    """Funnel keeps its blocks as lists of lists: the longest list is a part of them."""
    from transformers import FunnelConfig, FunnelForSequenceClassification

    from tunelab.methods.base import get_method

    model = FunnelForSequenceClassification(FunnelConfig(vocab_size=50, block_sizes=[3, 3], d_model=16, n_head=2,
                                                         d_head=8, d_inner=32, num_labels=2))
    for name in ("llrd", "freeze"):
        method = get_method(name)
        problems = method.check(model, method.Options(), None)
        assert problems == [f"{name}: the transformer blocks of FunnelForSequenceClassification are nested lists "
                            f"(funnel.encoder.blocks.N.M), whose order by depth {name} cannot tell; use full or "
                            "an adapter method"]


@pytest.mark.parametrize("block_sizes", [[3, 3, 3], [1, 1]])
def test_a_list_of_block_lists_found_as_the_stack_is_refused_too(block_sizes):
    """Funnel with as many groups as blocks in a group or more (funnel-transformer/medium: 3 × 3): the longest
    list found is the list of groups, whose parent is no list; llrd decayed per group, freeze.k=1 trained one."""
    from transformers import FunnelConfig, FunnelForSequenceClassification

    from tunelab.methods.base import get_method

    model = FunnelForSequenceClassification(FunnelConfig(vocab_size=50, block_sizes=block_sizes, d_model=16,
                                                         n_head=2, d_head=8, d_inner=32, num_labels=2))
    for name in ("llrd", "freeze"):
        method = get_method(name)
        assert method.check(model, method.Options(k=1) if name == "freeze" else method.Options(), None) == [
            f"{name}: the transformer blocks of FunnelForSequenceClassification are nested lists "
            f"(funnel.encoder.blocks.N.M), whose order by depth {name} cannot tell; use full or an adapter method"]


def test_encoder_decoder_classifiers_are_refused_by_methods_that_cannot_handle_two_stacks():
    """BART: llrd and freeze found the encoder's blocks and counted the whole decoder as the head (freeze.k=0,
    a linear probe, trained 29 k of 50 k parameters); peft's virtual tokens cannot reach its classifier."""
    from transformers import BartConfig, BartForSequenceClassification

    from tunelab.methods.base import get_method

    model = BartForSequenceClassification(BartConfig(vocab_size=50, d_model=16, encoder_layers=2, decoder_layers=2,
                                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                                     encoder_ffn_dim=32, decoder_ffn_dim=32, num_labels=2))
    for name in ("llrd", "freeze"):
        method = get_method(name)
        assert method.check(model, method.Options(), None) == [
            f"{name}: BartForSequenceClassification has an encoder and a decoder, two stacks of blocks, whose order "
            f"by depth {name} cannot tell (the decoder would count as the head); use full or an adapter method"]
    for name in ("prompt-tuning", "p-tuning", "prefix-tuning"):
        method = get_method(name)
        problems = method.check(model, method.Options(), None)
        assert len(problems) == 1 and "cannot hand virtual tokens to an encoder-decoder model" in problems[0]
