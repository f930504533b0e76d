"""The evaluation's bad-input error: one line, reported before any work starts."""

from __future__ import annotations

__all__ = ["EvaluationError", "one_line"]


class EvaluationError(Exception):
    """Bad input (a missing checkpoint, a suite that does not fit, an unwritable output folder ...).

    The message is one line; ``eval.py`` prints it as ``eval.py: error: <message>`` with exit status 2.
    """


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (or its type name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__
