"""The estimate's depth shortcut (src/tunelab/estimate/depth.py) against tracing the whole depth, on tiny
configs of many architectures: full fine-tuning, plain and with gradient checkpointing, fp32 and bf16.

The test suite checks every method on a Llama and a BERT config; this checks that the premise (a step's
segments are affine in the depth) holds for other block designs too. Prints one line per case: EXACT (every
part equal to the byte), DIFF (both peaks), refused (the shortcut declined: the whole depth is traced), or
the error. Takes about two minutes on 2 cores.

    python benchmarks/depth_extrapolation_check.py
"""
from __future__ import annotations

import functools

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from tunelab.estimate.depth import extrapolated_step, shallow_configs
from tunelab.estimate.fake_step import measure_step

LAYERS = 9
SMALL = {"vocab_size": 1000}
ARCHITECTURES = {  # model type → (auto class, config sizes)
    "gpt2": (AutoModelForCausalLM, {"n_embd": 64, "n_head": 4, "n_layer": LAYERS, "n_positions": 128}),
    "opt": (AutoModelForCausalLM, {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": LAYERS,
                                   "ffn_dim": 128, "word_embed_proj_dim": 64}),
    "qwen2": (AutoModelForCausalLM, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "num_hidden_layers": LAYERS, "intermediate_size": 128}),
    "mistral": (AutoModelForCausalLM, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "num_hidden_layers": LAYERS, "intermediate_size": 128}),
    "phi3": (AutoModelForCausalLM, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "num_hidden_layers": LAYERS, "intermediate_size": 128, "pad_token_id": 0}),
    "gemma": (AutoModelForCausalLM, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "num_hidden_layers": LAYERS, "intermediate_size": 128, "head_dim": 16}),
    "gpt_neox": (AutoModelForCausalLM, {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": LAYERS,
                                        "intermediate_size": 128}),
    "falcon": (AutoModelForCausalLM, {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": LAYERS}),
    "bloom": (AutoModelForCausalLM, {"hidden_size": 64, "n_head": 4, "n_layer": LAYERS}),
    "distilbert": (AutoModelForSequenceClassification, {"dim": 64, "n_heads": 4, "n_layers": LAYERS,
                                                        "hidden_dim": 128}),
    "roberta": (AutoModelForSequenceClassification, {"hidden_size": 64, "num_attention_heads": 4,
                                                     "num_hidden_layers": LAYERS, "intermediate_size": 128}),
    # sliding and full attention alternate: the shortcut must decline
    "qwen2 (sliding from layer 5)": (AutoModelForCausalLM, {
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": LAYERS,
        "intermediate_size": 128, "use_sliding_window": True, "max_window_layers": 5, "sliding_window": 16}),
}


def meta_model(auto_class, config):
    with torch.device("meta"):
        return auto_class.from_config(config)


def check(model_type: str, auto_class, sizes: dict, checkpointing: bool, precision: str) -> str:
    config = AutoConfig.for_model(model_type.split(" ")[0], **SMALL, **sizes)
    shallow = shallow_configs(config, LAYERS)
    causal = auto_class is AutoModelForCausalLM
    ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
    labels = ids if causal else torch.zeros(2, dtype=torch.long, device="meta")
    measure = functools.partial(measure_step, inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                      "labels": labels},
                                precision=precision, device="cpu", checkpointing=checkpointing)
    full = meta_model(auto_class, config)
    step = None
    if shallow:
        step = extrapolated_step(full, lambda depth: meta_model(auto_class, shallow[depth]),
                                 functools.partial(measure, segmented=True))
    if step is None:
        return "refused"
    whole = measure(full)
    if all(abs(a - b) < 1e-6 for a, b in zip(step.parts().values(), whole.parts().values())):
        return f"EXACT ({whole.peak_mb:.3f} MB)"
    return f"DIFF extrapolated {step.peak_mb:.3f} MB, whole depth {whole.peak_mb:.3f} MB"


def main() -> None:
    from tunelab.models.loading import quiet_transformers

    quiet_transformers()
    for model_type, (auto_class, sizes) in ARCHITECTURES.items():
        for precision in ("fp32", "bf16"):
            for checkpointing in (False, True):
                try:
                    outcome = check(model_type, auto_class, sizes, checkpointing, precision)
                except Exception as exc:  # noqa: BLE001 - reported per case
                    outcome = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                mode = "checkpointed" if checkpointing else "plain"
                print(f"{model_type:<30} {precision:<5} {mode:<13} {outcome}", flush=True)


if __name__ == "__main__":
    main()
