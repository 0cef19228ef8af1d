"""Prefix tuning on an encoder classifier: peft's prefix reaches BERT's attention through transformers 5's `cache`."""
import torch
from transformers import BertConfig, BertForSequenceClassification

from tunelab.methods.prefix_tuning import accept_prefix_as_cache


def prefixed_bert():
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, num_labels=2)
    model = BertForSequenceClassification(config)
    accept_prefix_as_cache(model)
    return get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5)).eval()


def test_the_prefix_changes_the_logits():
    model = prefixed_bert()
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.prompt_encoder["default"].embedding.weight.add_(1.0)
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_padding_is_masked_behind_the_prefix():
    # peft extends the attention mask by the prefix: padded positions must not change the logits
    model = prefixed_bert()
    ids = torch.randint(1, 100, (1, 7))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    other_padding = ids.clone()
    other_padding[0, 5:] = 0
    with torch.no_grad():
        short = model(input_ids=ids[:, :5], attention_mask=mask[:, :5]).logits
        padded = model(input_ids=ids, attention_mask=mask).logits
        repadded = model(input_ids=other_padding, attention_mask=mask).logits
    torch.testing.assert_close(padded, short)
    assert torch.equal(padded, repadded)


def test_a_model_that_takes_the_cache_is_left_alone():
    model = BertForSequenceClassification(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=8))
    accept_prefix_as_cache(model.bert)  # BertModel's forward has `cache` already
    assert "forward" not in vars(model.bert)
