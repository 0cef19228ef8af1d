"""Hyperparameter sweeps: one optuna study per method, trials trained like any other run (own process),
intermediate validation results reported so a pruner stops bad trials early. The study lives in optuna's
storage (a SQLite file in the experiment folder by default), so any worker pointed at it can join."""


# `tunelab.sweep(...)` runs the sweep command (`tunelab.api.sweep`), this package being that name too
from .._commands import make_callable  # noqa: E402

make_callable(__name__, "tunelab.api", "sweep")
