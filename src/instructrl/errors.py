"""Exceptions shown to users as a one-line message instead of a traceback."""

from __future__ import annotations


class UserFacingError(Exception):
    """An error whose message tells the user what went wrong and what to change."""


class DataError(UserFacingError, ValueError):
    """A bad input record: names the file, the line (1-based) and the field when known."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        if field is not None:
            message = f"field '{field}': {message}"
        super().__init__(where + message)
