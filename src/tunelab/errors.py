"""Errors that tunelab reports to users without a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable, Mapping, Sequence


class TunelabInputError(Exception):
    """Bad user input (config, data, model path). Carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CompareInterrupted(Exception):
    """Ctrl-C: the running method checkpointed; partial results and report were written."""

    exit_code = 130


def did_you_mean(value: str, allowed: Iterable[str], aliases: Mapping[str, Sequence[str]] | None = None) -> str:
    """A ' (did you mean 'x'?)' suffix, or '' when nothing is close. Case-insensitive, so 'LoRA' points at
    'lora' (which is still what must be written); `aliases` names what other tools call an allowed value
    ('rank' for 'r'), too unlike it for string similarity: the first candidate that is allowed wins."""
    allowed = [str(a) for a in allowed]
    named = [a for a in (aliases or {}).get(str(value).lower(), ()) if a in allowed]
    by_lower = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1, cutoff=0.6)
    name = named[0] if named else by_lower[close[0]] if close else None
    return f" (did you mean '{name}'?)" if name else ""


def one_of(allowed: Iterable[str]) -> str:
    return ", ".join(repr(a) for a in allowed)
