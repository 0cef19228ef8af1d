"""Dropout that costs less on a CPU, with the same meaning: keep each element with probability 1 - p, scale by
1 / (1 - p).

On a CPU, torch draws dropout masks with `bernoulli_` on one thread; profiling the packaged MiniLM LoRA step
in bf16 put 38 % of the step there (32 masks a step). Here a small p (up to 0.2) draws the positions to drop
instead, p · n uniform numbers for n elements (`drop_positions`), and a larger p a mask from half as many 32-bit
draws as elements (`keep_mask`): for a 16 × 80 × 384 activation at p = 0.1, drawing and applying both ways take
0.45 ms against 0.9–2.2 ms for the mask of words and 2.0 ms for bernoulli_'s mask alone; backward keeps only
the positions or the boolean mask. Attention
dropout happens inside `scaled_dot_product_attention`, which has no CPU kernel with dropout (it falls back to
its math path), so while training with attention dropout the same math runs here with the cheaper mask. The
same math also trains short bf16 attention without dropout (Llama-style models), where torch's SDPA kernel is
several times slower (`math_is_faster`); every other case goes to transformers' own SDPA function unchanged.
On CUDA nothing changes: its masks are drawn in parallel, and its fused attention kernels do dropout themselves.

Applied around training only (`cheaper_cpu_dropout`): evaluation has no dropout, and a saved model keeps
its own attention setting.
"""
from __future__ import annotations

import contextlib
import math
import sys

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

ATTENTION = "tunelab_cpu_sdpa"


SPARSE_UP_TO = 0.2  # drop probabilities drawn as positions (below); measured 1.2-5x cheaper up to here, slower above


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    if p <= SPARSE_UP_TO:
        return _Dropout.apply(x, drop_positions(x.numel(), p, x.device), 1.0 / (1.0 - p), _zeroed)
    return _Dropout.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p), _scaled)


def drop_positions(count: int, p: float, device: torch.device) -> torch.Tensor:
    """The sorted flat positions to drop among `count` elements, each dropped with probability p on its own.

    The gaps between dropped elements of independent Bernoulli(p) trials are geometric, so p · count uniform
    draws decide a mask (a tenth of the elements at p = 0.1, where a mask of words needs half): gap =
    floor(log(1 - u) / log(1 - p)). float32 draws resolve p to about 1e-7, finer than the word mask's 2^-15.
    Draws are topped up in the rare case that those drawn end before `count`."""
    expected = count * p
    draws = [_gap_ends(int(expected + 6 * math.sqrt(expected) + 16), p, device)]  # short: under 1e-9 a mask
    if is_fake(draws[0]):  # estimating memory on fake tensors: no values to look at, the size is what counts
        return draws[0]
    while int(draws[-1][-1]) < count:
        draws.append(_gap_ends(int(expected) // 8 + 16, p, device).add_(int(draws[-1][-1]) + 1))
    positions = torch.cat(draws) if len(draws) > 1 else draws[0]
    return positions[: int(torch.searchsorted(positions, count))]


def _gap_ends(draws: int, p: float, device: torch.device) -> torch.Tensor:
    """Positions 0, 1, ... of the next `draws` dropped elements, counting from 0."""
    uniform = torch.empty(draws, device=device).uniform_()
    failures = torch.log1p(uniform.neg_()).div_(math.log1p(-p)).to(torch.int64)  # before each drop
    return torch.cumsum(failures.add_(1), 0).sub_(1)


class _Dropout(torch.autograd.Function):
    """Dropout through `product(x, drop, scale)` both ways: it is linear in x, so its gradient is dropped and
    scaled alike, and backward keeps only `drop` (the positions or the boolean mask), not x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor, scale: float, product) -> torch.Tensor:
        ctx.save_for_backward(drop)
        ctx.scale, ctx.product = scale, product
        return product(x, drop, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return ctx.product(grad, drop, ctx.scale), None, None, None


def _zeroed(x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """x · scale with the elements at `positions` zeroed: one pass over x, and scattered writes to a p-th of it.
    x · scale rounds once, as `x * keep * scale` does where keep is 1, so the values equal it."""
    out = x.mul(scale).contiguous()  # positions count in row-major order
    out.view(-1).index_fill_(0, positions, 0)
    return out


def _scaled(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x · keep · scale in one pass over x. `x * keep * scale` makes two, the first through torch's slow mixed
    bool × float path. Here the mask is converted first (read as uint8, a fast cast of one byte per element),
    then `addcmul` computes 0 + scale · x · keep in float and rounds once: x · keep is exact (keep is 0 or 1),
    so the values are those of `x * keep * scale`, bit for bit; a dropout's forward and backward take
    1.3–1.6× less time (bf16, 16 × 64 × 384)."""
    keep_as_x = keep.view(torch.uint8).to(x.dtype)  # read as uint8: a vectorised conversion, unlike bool's
    return torch.addcmul(x.new_zeros(()), x, keep_as_x, value=scale)


LOW_HALF = 0 if sys.byteorder == "little" else 1  # where an int32's low 16 bits sit among its two int16s


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """True with probability 1 - p (to within 2^-15), from half as many generator draws as elements.

    `random_()` on int32 gives 31 uniform bits per draw, far cheaper than a uniform float: its low 16 bits, read
    as an int16, decide one element and its high 15 bits another, each against its own threshold. The first
    half of the mask comes from the low bits and the second from the whole words (which element gets which
    draw does not matter), so each comparison is against one number and writes contiguous memory."""
    count = math.prod(shape)
    half = (count + 1) // 2
    words = torch.empty(half, dtype=torch.int32, device=device).random_()
    keep = torch.empty(2 * half, dtype=torch.bool, device=device)
    from_low, from_high = keep.split(half)
    torch.ge(words.view(torch.int16)[LOW_HALF::2], round(p * 2**16) - 2**15, out=from_low)
    torch.ge(words, round(p * 2**15) << 16, out=from_high)  # the high bits reach the threshold iff the word does
    return keep[:count].view(shape)


class CheaperDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x.mul(0) if self.p == 1 else dropout(x, self.p)


def attention(module, query, key, value, attention_mask, dropout_p: float = 0.0, scaling=None, is_causal=None,
              **kwargs):
    """transformers' attention-function signature: softmax(q·kᵀ·scale + mask) with the cheaper dropout, then ·v."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    unsupported = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    if unsupported or not (dropout_p or math_is_faster(query, key)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout_p, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if q_length > 1 and attention_mask is None and causal:  # as transformers' SDPA: top-left aligned
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        attention_mask = torch.ones(q_length, q_length, dtype=torch.bool, device=query.device).tril()
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # a finite minimum, as eager attention: no NaN on a fully masked row
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[2]]
    # in the scores' dtype: torch's CPU softmax accumulates a bf16 row in fp32 and rounds once, so the forward
    # equals an fp32 softmax and a cast, without a cast each way in both passes (4 % of a bf16 MiniLM step on
    # AMX); the backward then starts from the rounded probabilities. (An fp32 additive mask makes fp32 scores.)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    output = torch.matmul(dropout(probs, dropout_p) if dropout_p else probs, value)
    return output.transpose(1, 2).contiguous(), None


MATH_FASTER_UP_TO = 256  # keys; see math_is_faster


def math_is_faster(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether plain matmul-softmax-matmul trains faster than torch's SDPA kernel for this bf16 attention.

    Measured on a 2-core Xeon with AMX (fwd + bwd, torch 2.13): SDPA's bf16 kernel took 5.0x the time at 72 keys
    (head size 32), 2.2x at 128, 1.1-1.5x at 256, and 0.9x at 320-384; from 512 keys on it is 2x faster.
    In fp32 they are even up to 128 keys and SDPA wins beyond, so fp32 keeps SDPA. The math path keeps the
    probabilities for backward, batch x heads x keys^2 in bf16 a layer (16 x 12 x 128^2: 6 MB); `estimate`
    traces this path, so it counts them."""
    device = query.device.type
    # under autocast both paths multiply in its dtype, even where RoPE made the query fp32 (Llama)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return dtype == torch.bfloat16 and key.shape[-2] <= MATH_FASTER_UP_TO


def _dropout_keyword(module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs):
    return attention(module, query, key, value, attention_mask, dropout_p=dropout, **kwargs)


@contextlib.contextmanager
def cheaper_cpu_dropout(model: nn.Module, device: torch.device, enabled: bool = True):
    """Within the block, `model` trains with the cheaper dropout where it runs on a CPU; restored after.
    Not under torch.compile (`enabled=False`): it cannot trace `random_()`, and draws fused masks of its own."""
    if not cheaper_dropout_applies(model, device, enabled):
        yield
        return
    swapped = [m for m in model.modules() if type(m) is nn.Dropout]
    for module in swapped:
        module.__class__ = CheaperDropout
    transformer = _sdpa_model(model)
    if transformer is not None:
        _register()
        transformer.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = nn.Dropout
        if transformer is not None:
            transformer.set_attn_implementation("sdpa")


def cheaper_dropout_applies(model: nn.Module, device: torch.device, enabled: bool = True) -> bool:
    """Whether `cheaper_cpu_dropout` changes anything: a CPU, and dropout modules or SDPA attention to swap."""
    return enabled and device.type == "cpu" and (any(type(m) is nn.Dropout for m in model.modules())
                                                 or _sdpa_model(model) is not None)


def _sdpa_model(model: nn.Module):
    """The outermost transformers model inside `model` (a peft wrapper's base), where it uses SDPA attention."""
    from transformers import PreTrainedModel

    found = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if found is None or getattr(found.config, "_attn_implementation", None) != "sdpa":
        return None
    # older model classes call their attention directly and cannot switch (transformers would only warn)
    return found if found._can_set_attn_implementation() else None


def _register() -> None:
    """The attention function, and the masks SDPA gets (without a mask function of its own a model would build
    none, and padding would be attended to)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _dropout_keyword)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
