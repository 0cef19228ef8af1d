"""Prefix tuning on classifiers: peft's prefix reaches the attention of an encoder (BERT) and of a decoder
classifier (Llama) through transformers 5's `cache`."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from tunelab.methods.prefix_tuning import accept_prefix_as_cache


def prefixed(model):
    from peft import PrefixTuningConfig, get_peft_model

    accept_prefix_as_cache(model)
    return get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5)).eval()


def prefixed_bert():
    torch.manual_seed(0)
    return prefixed(BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=2)))


def prefixed_llama():
    torch.manual_seed(0)
    return prefixed(LlamaForSequenceClassification(LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, num_labels=2, pad_token_id=0)))


@pytest.mark.parametrize("build", [prefixed_bert, prefixed_llama])
def test_the_prefix_changes_the_logits(build):
    model = build()
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.prompt_encoder["default"].embedding.weight.add_(1.0)
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("build", [prefixed_bert, prefixed_llama])
def test_padding_is_masked_behind_the_prefix(build):
    # peft extends the attention mask by the prefix: padded positions must not change the logits (a decoder
    # classifier reads the last token that is not the pad id, so its padding is pad ids)
    model = build()
    ids = torch.randint(1, 100, (1, 7))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    padded = ids.clone()
    padded[0, 5:] = 0
    with torch.no_grad():
        short = model(input_ids=ids[:, :5], attention_mask=mask[:, :5]).logits
        torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits, short)
        if build is prefixed_bert:  # an encoder ignores whatever sits under the mask
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=padded, attention_mask=mask).logits)


def test_a_causal_lm_gets_the_prefix_as_its_cache_without_the_deprecated_name():
    """transformers 5 still reads past_key_values= (peft's keyword) with a FutureWarning at every step, until
    5.40 removes it; the prefix now arrives as `cache`, and changes the logits as before."""
    import inspect
    import warnings

    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=8))
    accept_prefix_as_cache(base)
    assert {"cache", "past_key_values", "logits_to_keep"} <= set(inspect.signature(base.forward).parameters)
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation warning would fail here
        before = model(input_ids=ids).logits
        model.prompt_encoder["default"].embedding.weight.add_(1.0)
        after = model(input_ids=ids).logits
    assert before.shape == (2, 5, 10) and not torch.allclose(before, after)


def test_the_prefix_sizes_are_read_from_any_config_naming(tmp_path):
    """peft reads a model's layers, heads and width from a few config names only; MPT's n_layers, n_heads and
    d_model are not among them, and peft refused to build the prefix."""
    from peft import get_peft_model
    from transformers import MptConfig, MptForCausalLM

    from tunelab.methods.base import PrepareContext, get_method
    from tunelab.tasks.base import registry

    model = MptForCausalLM(MptConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=32))
    method, task = get_method("prefix-tuning"), registry()["causal-lm"]
    options = method.Options(num_virtual_tokens=3)
    config = method.peft_config(model, options, PrepareContext(str(tmp_path), str(tmp_path), task, ()))
    accept_prefix_as_cache(model)  # as prepare does
    adapted = get_peft_model(model, config)
    ids = torch.randint(0, 50, (2, 5))
    adapted(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    assert adapted.prompt_encoder["default"].embedding.weight.grad is not None
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == method.method_params(model, options, None)


@pytest.mark.parametrize("model_type, positions, pad, usable", [
    ("roberta", 514, 1, 512), ("camembert", 514, 1, 512), ("mpnet", 32, 0, 31), ("bert", 512, 0, 512)])
def test_models_whose_positions_start_after_the_padding_index_hold_fewer_tokens(model_type, positions, pad, usable):
    from transformers import AutoConfig

    from tunelab.models.structure import max_positions

    config = AutoConfig.for_model(model_type, max_position_embeddings=positions, pad_token_id=pad)
    assert max_positions(config) == usable


def test_a_prefix_is_as_wide_as_attention_where_embeddings_are_narrower(tmp_path):
    """ELECTRA (like ALBERT) projects narrower embeddings up to the hidden size: the prefix's keys and values are
    the attention's width (the embeddings' failed every step and missed the method's own count)."""
    from peft import get_peft_model
    from transformers import ElectraConfig, ElectraForSequenceClassification

    from tunelab.methods.base import PrepareContext, get_method
    from tunelab.tasks.base import registry

    model = ElectraForSequenceClassification(ElectraConfig(
        vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, num_labels=2))
    method, task = get_method("prefix-tuning"), registry()["classification"]
    options = method.Options(num_virtual_tokens=3)
    config = method.peft_config(model, options, PrepareContext(str(tmp_path), str(tmp_path), task, ("classifier",)))
    accept_prefix_as_cache(model)
    adapted = get_peft_model(model, config)
    ids = torch.randint(0, 50, (2, 5))
    adapted(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
    assert adapted.prompt_encoder["default"].embedding.weight.grad is not None
    assert adapted.prompt_encoder["default"].embedding.weight.numel() == method.method_params(model, options, None)
