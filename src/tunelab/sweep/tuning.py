"""`compare --tune N`: before a comparison's runs, each method's own optuna study of N trials on the validation
split, in the experiment's own storage; the comparison then trains each method with its best values."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .report import write_sweep
from .storage import default_storage
from .study import TUNE_STUDY, SweepFailed, open_study, run_study, study_summary


def tune_methods(cfg, job, out_dir: Path, trials: int, show_progress: bool, resume: bool,
                 nproc: int = 1) -> dict[str, dict[str, Any]]:
    """Each method's best values after `trials` optuna trials (validation split only); {} where none finished.
    The studies are the experiment's own: a resume with another config (allow_config_change) continues them."""
    storage, studies = default_storage(out_dir), {}
    for method in cfg.methods:
        try:
            run_study(cfg, job, method, out_dir, trials, storage, TUNE_STUDY, show_progress, resume, seeded=True,
                      nproc=nproc, checks_config=False)
        except SweepFailed as exc:  # its best so far, or none: then it trains with the configured values
            print(f"tunelab: {exc}", file=sys.stderr)
        studies[method] = study_summary(open_study(cfg, method, storage, TUNE_STUDY, True, checks_config=False))
    write_sweep(out_dir, job.summary(), studies)
    for method in [m for m, s in studies.items() if not s["best"]]:
        print(f"tunelab: no tuning trial of {method} finished (all pruned or failed, see sweep.md); "
              "it trains with the configured values", file=sys.stderr)
    return {m: (s["best"] or {}).get("params", {}) for m, s in studies.items()}
