"""Hyperparameter sweeps: one optuna study per method, trials trained like any other run (own process),
intermediate validation results reported so a pruner stops bad trials early. The study lives in optuna's
storage (a SQLite file in the experiment folder by default), so any worker pointed at it can join."""
