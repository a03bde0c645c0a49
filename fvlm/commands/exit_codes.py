"""Exit codes of the ``fvlm`` commands (listed in docs/reference/cli.md)."""
from __future__ import annotations

import enum

from fvlm.errors import InvalidParameterError, SelectorArgumentError, UnknownNameError, UsageError


class ExitCode(enum.IntEnum):
    OK = 0  # done: every requested sample (or panel) has its answer
    FAILED = 1  # an error stopped the command
    USAGE = 2  # bad arguments, recipe, selector argument or data: nothing ran
    INCOMPLETE = 3  # finished, but some requested samples (or panels) have no answer
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); a rerun resumes
    TERMINATED = 143  # SIGTERM (128 + SIGTERM), e.g. a scheduler's grace signal; a rerun resumes


USAGE_ERRORS = (UsageError, UnknownNameError, InvalidParameterError, SelectorArgumentError)


def for_error(exc: BaseException) -> ExitCode:
    """The exit code of a command that stopped on ``exc`` (an [`FVLMError`][fvlm.errors.FVLMError])."""
    return ExitCode.USAGE if isinstance(exc, USAGE_ERRORS) else ExitCode.FAILED
