"""Errors a user can fix, kept apart from program bugs.

`run.py` prints a `UserError` as one line, `error: <message>`, and exits with status 2. Any other
exception is a bug and keeps its traceback. The message is all the user sees, so it names the file:line
or the config key (`selection.fraction=2`) and says what to do. `HYDRA_FULL_ERROR=1` shows the traceback
of a user error too.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Bad input the user can fix: a malformed record, a missing file, a bad config value, missing
    offline data."""


class ConfigError(UserError, ValueError):
    """A config value that is out of range or unknown; the message names the key and the choices."""


class UnknownNameError(UserError, LookupError):
    """A registry name (scorer, suite, reader, model source) that is not registered."""


class MissingInputError(UserError, FileNotFoundError):
    """An input file or upstream artifact that is not there; the message says which stage or key makes it."""
