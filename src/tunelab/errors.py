"""Errors that tunelab reports to users without a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class TunelabInputError(Exception):
    """Bad user input (config, data, model path). Carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CompareInterrupted(Exception):
    """Ctrl-C: the running method checkpointed; partial results and report were written."""

    exit_code = 130


def did_you_mean(value: str, allowed: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_of(allowed: Iterable[str]) -> str:
    return ", ".join(repr(a) for a in allowed)
