"""Error types for user mistakes and bad input: the CLI prints them without a traceback."""

from __future__ import annotations

from pathlib import Path


class CxrdxError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting."""


class ParameterError(CxrdxError):
    """A bad value of one named parameter of a library function; the CLI names its option instead."""

    def __init__(self, parameter: str, value: object, problem: str):
        self.parameter, self.value, self.problem = parameter, value, problem
        super().__init__(f"{parameter} {value}: {problem}")

    def __reduce__(self):
        return (type(self), (self.parameter, self.value, self.problem))


class ImageReadError(CxrdxError):
    """An image that cannot be decoded; names the file and the reason."""

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self):  # rebuilt intact when a DataLoader worker sends it back
        return (type(self), (self.source, self.reason))


class CxrdxWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it on one line."""


class MissingImagesWarning(CxrdxWarning):
    """Images a split or table lists were left out because they are not there (allowed by the user)."""
