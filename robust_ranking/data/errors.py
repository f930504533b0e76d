"""The project's own error for bad data settings and bad data files."""

from __future__ import annotations


class DataConfigError(ValueError):
    """A data setting or data file the project refuses, with a message that says how to fix it.

    Raised by the data modules, the batch sampler and the IDX reader (never for programming errors),
    so that ``train.py`` can print it as one ``train.py: error: ...`` line while genuine bugs still
    show their traceback. A ``ValueError``, so ``except ValueError`` keeps working.
    """


class DataNotFoundError(DataConfigError, FileNotFoundError):
    """A dataset folder, annotation file or image that is not there (the message names it and says
    where it should be). Both a :class:`DataConfigError` and a ``FileNotFoundError``."""
