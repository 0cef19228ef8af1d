"""The comparison report, built from results.json alone (so it can be rebuilt for old experiments)."""
from .markdown import table, write_report  # noqa: F401


# `tunelab.report(...)` runs the report command (`tunelab.api_plan.report`), this package being that name too
from .._commands import make_callable  # noqa: E402

make_callable(__name__, "tunelab.api_plan", "report")
