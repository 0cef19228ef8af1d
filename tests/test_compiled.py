"""`train.compile`: training steps through torch.compile train what eager steps train."""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from tunelab.config import load_config
from tunelab.experiment.job import prepare_job
from tunelab.experiment.runner import setup_method
from tunelab.train.loop import TrainingLoop, Validation


def trained_with(tiny_overrides, mode: str):
    # max_length 16: most rows reach it, so the three steps compile few shapes (compiling is the slow part)
    extra = ["train.max_steps=3", "data.max_length=16", "train.eval_every_steps=0", f"train.compile={mode}"]
    job = prepare_job(load_config(None, [*tiny_overrides, "methods=full", *extra]))
    setup = setup_method(job, "full")
    loop = TrainingLoop(setup.model, setup.optimizer, setup.scheduler, setup.accelerator, job.config.train,
                        job.train, Validation(lambda model: {"accuracy": 0.5}, "accuracy", True))
    counters.clear()
    state = loop.run()
    return loop, state, {k: v.detach().clone() for k, v in setup.model.state_dict().items()}, dict(counters)


def test_compiled_steps_train_the_same_weights_in_one_graph(tiny_overrides):
    """The tiny BERT has no dropout, so both runs draw nothing random and must agree up to kernel rounding."""
    eager_loop, eager, eager_weights, _ = trained_with(tiny_overrides, "none")
    compiled_loop, compiled, compiled_weights, compile_counters = trained_with(tiny_overrides, "default")
    assert compiled_loop.train_forward.compiled and not eager_loop.train_forward.compiled
    assert compile_counters["stats"]["unique_graphs"] >= 1  # it did compile
    # no graph breaks (a backend failure, e.g. on a sparse gradient, is one too): the forward is compiled whole
    assert not compile_counters.get("unimplemented") and not compile_counters.get("graph_break")
    # the sparse embedding gradient (eager CPU only) would break the graph; the saved keys are the model's own
    assert eager_loop.embedding_grad.embedding is not None and compiled_loop.embedding_grad.embedding is None
    assert list(compiled_weights) == list(eager_weights)
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-5, atol=1e-6)
    for name, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], value, rtol=1e-4, atol=5e-4, msg=name)
