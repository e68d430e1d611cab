"""The two kinds of failure the CLI maps to exit statuses."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: a run file, flag, checkpoint or data path. Exit status 2.

    The message is one line naming the file, the key path and what was expected.
    """


class RunFailure(Exception):
    """A failure while running (non-finite loss, a plugin that raised). Exit status 1."""


def where(source: str | None, key: str | None = None) -> str:
    """Format the 'FILE: key.path: ' prefix of an error line."""
    parts = [p for p in (source, key) if p]
    return ": ".join(parts) + (": " if parts else "")
