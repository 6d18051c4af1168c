"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``drrl: error: <message>`` and exits with ``exit_code``; library callers can catch
:class:`DrrlError`.
"""

from __future__ import annotations


class DrrlError(Exception):
    """Base class of every error caused by bad input (config, data, checkpoint, paths)."""

    exit_code = 1


class ConfigError(DrrlError, ValueError):
    """A configuration key is unknown, has the wrong type or is out of range."""

    exit_code = 2


class DataError(DrrlError):
    """A corpus or tokenizer cannot be loaded or does not fit the model."""


class CheckpointError(DrrlError):
    """A checkpoint is missing, truncated or corrupted."""


class Interrupted(DrrlError):
    """Training stopped on SIGTERM after writing a checkpoint of the last finished step."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a terminated process
