"""A deep model's step memory comes from fake steps of 3 and 4 of its blocks (estimate/depth.py). For every
method and task it must equal the fake step of the whole depth to the byte, plain and with gradient
checkpointing; where the blocks are not all the same the whole depth is traced instead."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, LlamaConfig, Qwen2Config

import tunelab.estimate as estimate_module
from tunelab.config import load_config
from tunelab.methods.base import registry
from tunelab.estimate import estimate
from tunelab.estimate import depth
from tunelab.estimate.depth import SHALLOW_DEPTHS, WORTH_IT_FROM, extrapolated_step, shallow_configs

# deep enough that interior blocks are extrapolated past those measured (the 2nd and 3rd of 4); shallower than
# the shortcut needs to pay, which the test lowers, for time: tracing costs per block
LAYERS = 6


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory):
    folders = {"classification": tmp_path_factory.mktemp("deep-bert"),
               "causal-lm": tmp_path_factory.mktemp("deep-llama")}
    BertConfig(vocab_size=3000, hidden_size=64, intermediate_size=160, num_hidden_layers=LAYERS,
               num_attention_heads=4, max_position_embeddings=256).save_pretrained(folders["classification"])
    LlamaConfig(vocab_size=3000, hidden_size=64, intermediate_size=160, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=False).save_pretrained(folders["causal-lm"])
    return folders


# Every method on the language model, in bf16 (autocast's dtypes differ per operator). The encoder's blocks
# take the same methods the same way; what differs is outside the blocks (embeddings, pooler, head), so there
# one method of each family is enough, in fp32, and BitFit (Llama has no biases). Planned for a GPU that is not
# here, so that no device is calibrated: the fake step itself runs the same either way.
ENCODER_METHODS = ["full", "lora", "ia3", "bitfit", "prompt-tuning", "prefix-tuning", "freeze"]


@pytest.mark.parametrize("task,precision", [("classification", "fp32"), ("causal-lm", "bf16")])
def test_extrapolated_steps_equal_the_whole_depths(task, precision, deep_models, monkeypatch):
    compared = []
    extrapolating = estimate_module.fake_step_of

    def compared_with_whole_depth(prepared, prepare_at, measure, depths, layers):
        step, source = extrapolating(prepared, prepare_at, measure, depths, layers)
        if source != "fake step":  # the whole model is still untouched: measure it too
            whole = measure(prepared)
            assert step.parts() == pytest.approx(whole.parts(), abs=1e-9), source  # MB: to the byte
            compared.append(source)
        return step, source

    monkeypatch.setattr(estimate_module, "fake_step_of", compared_with_whole_depth)
    monkeypatch.setattr(depth, "WORTH_IT_FROM", LAYERS)
    cfg = load_config(None, [f"task={task}", f"model.name_or_path={deep_models[task]}", "train.batch_size=4",
                             "data.max_length=64", "prompt-tuning.init=random", "train.device=cuda",
                             f"train.precision={precision}", "freeze.k=2",
                             f"methods={','.join(registry() if task == 'causal-lm' else ENCODER_METHODS)}"])
    methods = estimate(cfg, 1000, skip_inapplicable=True)["methods"]
    by_source = {m["method"]: m["memory_from"] for m in methods}
    assert by_source.pop("freeze") == "fake step"  # its 2 trainable top blocks differ from the 4 below
    assert set(by_source.values()) == {f"fake steps of 3 and 4 blocks, extrapolated to {LAYERS} identical ones"}
    # each plain and checkpointed, but prefix tuning's checkpointed step, which cannot run
    checkpointed = [m for m in methods if m["peak_memory_checkpointing_mb"] is not None and m["method"] != "freeze"]
    assert len(compared) == len(by_source) + len(checkpointed) >= 2 * len(by_source) - 1


def test_blocks_configured_differently_are_traced_whole():
    mixed = Qwen2Config(num_hidden_layers=12, use_sliding_window=True, max_window_layers=6)  # full, then sliding
    assert shallow_configs(mixed, 12) is None
    uniform = shallow_configs(Qwen2Config(num_hidden_layers=12), 12)
    assert {d: (c.num_hidden_layers, len(c.layer_types)) for d, c in uniform.items()} == {3: (3, 3), 4: (4, 4)}
    assert shallow_configs(Qwen2Config(num_hidden_layers=WORTH_IT_FROM - 1), WORTH_IT_FROM - 1) is None


def test_shallow_models_that_are_not_the_same_blocks_refuse_the_shortcut():
    def llama(layers: int, ffn: int = 160):
        with torch.device("meta"):
            from transformers import LlamaForCausalLM
            return LlamaForCausalLM(LlamaConfig(vocab_size=3000, hidden_size=64, intermediate_size=ffn,
                                                num_hidden_layers=layers, num_attention_heads=4))

    def never_measured(model):
        raise AssertionError("a refused shortcut measures nothing")

    assert extrapolated_step(llama(10), lambda d: llama(d, ffn=128), never_measured) is None  # other blocks
    assert extrapolated_step(llama(10), lambda d: llama(d + 1), never_measured) is None  # not 3 and 4 blocks
    frozen_top = llama(10)
    for param in frozen_top.model.layers[-1].parameters():
        param.requires_grad_(False)
    assert extrapolated_step(frozen_top, llama, never_measured) is None  # one block trains unlike the others
    assert SHALLOW_DEPTHS == (3, 4)
