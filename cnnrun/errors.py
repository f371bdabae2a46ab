"""One error family for everything a user can get wrong.

A :class:`UserError` is printed as a short message and exits with code 2; it never shows a traceback
(``CNNRUN_DEBUG=1`` re-raises it for developers). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence


class UserError(Exception):
    """A mistake in the user's input (config, spec, data, environment) with a message that says how to fix it."""

    exit_code = 2

    def render(self) -> str:
        return f"cnnrun: {self}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (a dotted key) and what."""

    key: str
    message: str
    where: str = ""  # the file or command-line override the value came from, when known

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}" if self.key else self.message
        return f"{text}  [{self.where}]" if self.where else text


class ConfigError(UserError):
    """Every problem found in one config source, reported together."""

    def __init__(self, problems: Sequence[Problem], source: str = "the config"):
        self.problems = list(problems)
        self.source = source
        super().__init__(self._text())

    def __reduce__(self):  # pickled back from a parallel sweep's worker process with its problems intact
        return (type(self), (self.problems, self.source))

    def _text(self) -> str:
        n = len(self.problems)
        head = f"{self.source} has {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head] + [f"  {p}" for p in self.problems])


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM, trainer.max_time); state was saved."""

    exit_code = 130


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or "" when nothing is close."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def one_of(choices: Iterable[str]) -> str:
    """Format allowed values the same way everywhere: 'a', 'b' or 'c'."""
    quoted = [f"'{c}'" for c in choices]
    if len(quoted) <= 1:
        return "".join(quoted)
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]
