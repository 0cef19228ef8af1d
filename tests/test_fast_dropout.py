"""The cheaper CPU dropout means what dropout means: the same keep probability and scale, masks drawn from the
seeded generator, and attention that equals transformers' own wherever the mask keeps everything."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tunelab.train import fast_dropout
from tunelab.train.fast_dropout import CheaperDropout, cheaper_cpu_dropout


def test_elements_are_dropped_with_probability_p_and_the_rest_scaled():
    layer = CheaperDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    out = layer(x)
    dropped = (out == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.002)  # 10^6 draws: 5 standard deviations is 0.0015
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient passes where the element was kept, scaled alike
    torch.manual_seed(0)
    assert torch.equal(layer(x), out)  # the seeded generator decides: resume replays the same masks
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_passes_equal_x_times_mask_times_scale_bit_for_bit(dtype):
    """The one-pass product rounds where `x * keep * (1 / (1 - p))` rounds, forward and backward."""
    torch.manual_seed(1)
    x = torch.randn(8, 40, 24, dtype=dtype, requires_grad=True)
    grad = torch.randn(8, 40, 24, dtype=dtype)
    torch.manual_seed(2)
    out = fast_dropout.dropout(x, 0.3)
    out.backward(grad)
    torch.manual_seed(2)
    keep = fast_dropout.keep_mask(x.shape, 0.3, x.device)
    assert torch.equal(out, x.detach() * keep * (1 / 0.7))
    assert torch.equal(x.grad, grad * keep * (1 / 0.7))
    assert out.dtype == dtype and x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropping_positions_equals_x_times_mask_times_scale(dtype):
    """At small p the dropped positions are drawn instead of a mask; values and gradient are still those of
    `x * keep * scale`, in the input's dtype, also for a transposed (non-contiguous) input."""
    torch.manual_seed(1)
    x = torch.randn(8, 40, 24, dtype=dtype).transpose(0, 1).requires_grad_()
    grad = torch.randn(40, 8, 24, dtype=dtype)
    torch.manual_seed(2)
    out = fast_dropout.dropout(x, 0.1)
    out.backward(grad)
    torch.manual_seed(2)
    keep = torch.ones(x.numel(), dtype=torch.bool)
    keep[fast_dropout.drop_positions(x.numel(), 0.1, x.device)] = False
    keep = keep.view(x.shape)
    assert 0 < (~keep).sum() < x.numel()
    assert torch.equal(out, x.detach() * keep * (1 / 0.9))
    assert torch.equal(x.grad, grad * keep * (1 / 0.9))
    assert out.dtype == dtype and x.grad.dtype == dtype


@pytest.mark.parametrize("first_draws", [None, 3])
def test_every_position_is_dropped_with_probability_p_independently(first_draws, monkeypatch):
    """Geometric gaps give each position, the last ones included, probability p, and neighbours independent;
    also where the first draws run out before the end and are topped up (forced here with 3 draws)."""
    if first_draws:
        gap_ends = fast_dropout._gap_ends
        calls = []
        monkeypatch.setattr(fast_dropout, "_gap_ends",
                            lambda n, p, d: calls.append(n) or gap_ends(first_draws if len(calls) == 1 else n, p, d))
    torch.manual_seed(0)
    trials, count, p = 20_000, 40, 0.2
    dropped = torch.zeros(trials, count, dtype=torch.bool)
    for trial in range(trials):
        dropped[trial, fast_dropout.drop_positions(count, p, torch.device("cpu"))] = True
    rate = dropped.float().mean(0)
    # 2·10^4 trials a position: one standard deviation is 0.0028, so 0.015 is over 5
    assert rate.sub(p).abs().max().item() < 0.015
    both = (dropped[:, :-1] & dropped[:, 1:]).float().mean().item()
    assert both == pytest.approx(p * p, abs=0.003)  # 7.8·10^5 pairs: 0.003 is over 6 standard deviations
    if first_draws:
        assert len(calls) > trials  # the top-up ran


def test_both_halves_of_a_mask_keep_one_minus_p():
    """The first half of a mask is decided by the words' low 16 bits, the second by their high 15 bits: each
    must keep 1 - p on its own (an uneven half would bias dropout where the halves fall, e.g. early rows)."""
    torch.manual_seed(0)
    half = 200_000
    mask = fast_dropout.keep_mask(torch.Size([2 * half - 1]), 0.25, torch.device("cpu"))
    # 2·10^5 draws each: 0.005 is over 5 standard deviations (0.001)
    assert mask[:half].float().mean().item() == pytest.approx(0.75, abs=0.005)
    assert mask[half:].float().mean().item() == pytest.approx(0.75, abs=0.005)


def tiny_models():
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3))
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_dropout=0.3, pad_token_id=0))
    return {"bert": bert, "llama": llama}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_attention_with_dropout_is_transformers_attention_where_nothing_is_dropped(name, precision, monkeypatch):
    """Padding mask (BERT), causal + padding and grouped key/value heads (Llama): with the mask made to keep
    everything, training-mode attention through tunelab's path equals the model's own evaluation (in bf16
    autocast to within bf16's rounding: the path's softmax runs in bf16, transformers' SDPA its own way)."""
    model = tiny_models()[name]
    ids = torch.randint(1, 50, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[2, :4] = 0  # left padding: the causal model's later tokens would otherwise attend to it
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        reference = model.eval()(input_ids=ids, attention_mask=mask).logits.float()
    used = []
    monkeypatch.setattr(fast_dropout, "dropout", lambda x, p: used.append(p) or x)
    with cheaper_cpu_dropout(model, torch.device("cpu")), autocast:
        assert model.config._attn_implementation == fast_dropout.ATTENTION
        got = model.train()(input_ids=ids, attention_mask=mask).logits.float()
    assert used == [0.3, 0.3]  # both layers' attention went through the cheaper path
    rows = mask.bool() if name == "llama" else slice(None)
    tolerance = 1e-5 if precision == "fp32" else 3e-2  # bf16 keeps 8 bits: ~0.4 % per rounding
    assert torch.allclose(got[rows], reference[rows], atol=tolerance)
    assert model.config._attn_implementation == "sdpa"  # restored: a saved model keeps its own setting


def test_the_math_path_is_masked_softmax_attention_in_both_passes(monkeypatch):
    """float64, a padding + causal mask with fully masked queries (left padding): output and gradients equal
    softmax(q·kᵀ·scale, masked by filling) · v, where nothing reads the fully masked query (as in a model: no
    real token attends to padding, and no loss reads it)."""
    import types

    monkeypatch.setattr(fast_dropout, "dropout", lambda x, p: x)  # the path without any element dropped
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6).clone()
    allowed[1, :, :, :2] = False  # the second row's first two tokens are padding: their queries see nothing
    upstream = torch.randn(2, 6, 4, 8, dtype=torch.float64)
    upstream[1, :2] = 0

    def reference():
        scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~allowed, torch.finfo(q.dtype).min)
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)
    module = types.SimpleNamespace(num_key_value_groups=1, is_causal=True)
    outputs = []
    for run in (lambda: fast_dropout.attention(module, q, k, v, allowed, dropout_p=0.3, scaling=0.3)[0], reference):
        out = run()
        outputs.append((out, *torch.autograd.grad(out, (q, k, v), upstream)))
    for got, expected in zip(*outputs):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_swap_is_undone_and_skips_other_devices():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    with cheaper_cpu_dropout(model, torch.device("cpu")):
        assert type(model[1]) is CheaperDropout
    assert type(model[1]) is nn.Dropout
    with cheaper_cpu_dropout(model, torch.device("meta")):
        assert type(model[1]) is nn.Dropout


@pytest.mark.parametrize("precision, length, path", [("bf16", 12, "math"), ("bf16", 300, "sdpa"),
                                                     ("fp32", 12, "sdpa")])
def test_attention_without_dropout_trains_through_math_only_where_that_is_faster(precision, length, path,
                                                                                 monkeypatch):
    """Short bf16 attention without dropout (Llama's default) trains through the math path, where torch's SDPA
    kernel is several times slower on a CPU; long or fp32 attention stays with transformers' SDPA. Both give
    the model's own output."""
    from transformers.integrations import sdpa_attention

    model = tiny_models()["llama"]
    model.config.attention_dropout = 0.0
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.0
    ids = torch.randint(1, 50, (2, length))
    mask = torch.ones_like(ids)
    mask[0, : length // 3] = 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        reference = model.eval()(input_ids=ids, attention_mask=mask).logits.float()
    through_sdpa = []
    original = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda *a, **k: through_sdpa.append(1) or original(*a, **k))
    with cheaper_cpu_dropout(model, torch.device("cpu")), autocast:
        got = model.train()(input_ids=ids, attention_mask=mask).logits.float()
    assert len(through_sdpa) == (2 if path == "sdpa" else 0)
    tolerance = 1e-5 if precision == "fp32" else 3e-2
    assert torch.allclose(got[mask.bool()], reference[mask.bool()], atol=tolerance)
