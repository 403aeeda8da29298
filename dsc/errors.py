"""Errors and exit codes.

Every error a user can fix is a `DscInputError`: it names the field (a recipe path such as
``stages[1].evaluate.stride``), the value, and the fix. The CLI maps error classes to the
documented exit codes, so scheduled jobs can tell bad input from a crash.
"""
from __future__ import annotations

import difflib
from enum import IntEnum
from typing import Iterable


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # a bug or an environment failure: worth a retry or a report
    BAD_INPUT = 2  # the recipe, a path, the model or the run directory needs fixing
    INTERRUPTED = 3  # SIGINT / SIGTERM: rerun to resume
    UNAVAILABLE = 4  # a remote service (the Hugging Face Hub) could not be reached or refused: retry later


class DscError(Exception):
    exit_code = ExitCode.FAILURE


class RemoteError(DscError):
    """The Hub (or another remote service) could not be reached, or refused the request."""

    exit_code = ExitCode.UNAVAILABLE


class DscInputError(DscError):
    """Bad input: a malformed recipe, a missing file, a model a stage cannot handle."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class FieldError(DscInputError):
    """Raised by a stage about one of its own config fields; the runner prefixes the stage's
    recipe path (`context_length` → `stages[2].evaluate.context_length`)."""


class RecipeError(DscInputError):
    """Several validation problems at once, so a user fixes a recipe in one pass."""

    def __init__(self, problems: list[DscInputError]):
        self.problems = problems
        super().__init__("", "\n".join(str(p) for p in problems))


def gather(problems: list[DscInputError], fn, *args):
    """Call fn; on input errors, add them to `problems` and return None (validate everything,
    then report everything)."""
    try:
        return fn(*args)
    except RecipeError as exc:
        problems.extend(exc.problems)
    except DscInputError as exc:
        problems.append(exc)
    return None


class RunInterrupted(DscError):
    exit_code = ExitCode.INTERRUPTED


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' did you mean X?' when a close match exists, else ''."""
    choices = list(choices)
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not match and len(word) >= 3:  # a truncated name: `save` for `save_model`
        match = [c for c in choices if c.startswith(word)][:1]
    return f"; did you mean {match[0]}?" if match else ""
