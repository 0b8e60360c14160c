"""Errors that reach the user as a one-paragraph message instead of a traceback.

Exit codes (documented in README.md): 0 success, 1 runtime failure, 2 usage or configuration
error, 75 stopped gracefully by a signal (resume with --resume; sysexits' EX_TEMPFAIL).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_STOPPED = 75


class FmbError(Exception):
    """A failure the user can act on; the message says what to do."""

    exit_code = EXIT_RUNTIME


class ConfigError(FmbError):
    """A bad configuration key, value, path reference or command-line usage."""

    exit_code = EXIT_USAGE


class DataError(FmbError):
    """A missing or malformed input file, column, field or row."""


class CheckpointError(FmbError):
    """A checkpoint that is missing, incomplete, of another family or does not fit the model."""


class TrainingError(FmbError):
    """Training cannot go on (for example, losses stay non-finite)."""
