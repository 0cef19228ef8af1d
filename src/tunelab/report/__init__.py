"""The comparison report, built from results.json alone (so it can be rebuilt for old experiments)."""
from .markdown import table, write_report  # noqa: F401
