"""Prompt tuning's default text initialisation comes from the data (the label names), not from one dataset."""
import torch

from tunelab.config import load_config
from tunelab.experiment.job import prepare_job
from tunelab.experiment.runner import setup_method


def test_the_soft_prompt_starts_from_the_label_names(tiny_overrides):
    job = prepare_job(load_config(None, [*tiny_overrides, "methods=prompt-tuning",
                                         "prompt-tuning.num_virtual_tokens=20"]))
    text = job.task.prompt_init_text(job.data.info)
    assert text == "Classify the text as neg or pos."
    model = setup_method(job, "prompt-tuning").model
    ids = job.tokenizer(text)["input_ids"]  # as peft tokenizes it, repeated up to the 20 virtual tokens
    ids = (ids * 20)[:20]
    words = model.get_input_embeddings().weight[ids]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, words)
