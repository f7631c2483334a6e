"""Errors a user can act on: each names the file and the problem, and prints as one line."""
from __future__ import annotations

from pathlib import Path


class OsteoError(Exception):
    """Base of every error this project raises on purpose."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)

    def __reduce__(self):
        """Rebuilt from (path, reason): an error raised in a worker process reaches the parent whole."""
        return type(self), (self.path, self.reason)


class InputError(OsteoError):
    """A site's input file is unreadable, inconsistent or implausible; the case is quarantined."""


class ConfigError(OsteoError):
    """A configuration value is missing or wrong."""


class StateError(OsteoError):
    """A persisted state file (checkpoint, site state) is corrupt or from an incompatible version."""
