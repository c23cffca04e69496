"""Errors the lab reports to a person: one clear message, where it happened, and what to do."""

from __future__ import annotations


class LabError(Exception):
    """A failure with a message for a person and, when there is one, the fix.

    The CLI prints `error: <message>` and, on the next line, `  fix: <fix>`, then exits non-zero.
    """

    exit_code = 1

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message


class ManifestError(LabError):
    """A manifest the lab cannot accept: names the file and line, like kubectl's decoder does."""

    def __init__(self, where: object, message: str, fix: str = "") -> None:
        super().__init__(f"{where}: {message}", fix)
        self.where = where


class NotFound(LabError):
    """An object asked for by name does not exist (kubectl's `Error from server (NotFound)`)."""

    exit_code = 1
