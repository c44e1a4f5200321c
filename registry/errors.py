"""Errors raised by the registry. Every one is a `RegistryError`, so callers can catch them all."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every error the registry raises."""


class ProfileNotFound(RegistryError, LookupError):
    """A reference names a model, version, tag or hash that the registry (and the seeds) lack."""


class InvalidReference(RegistryError, ValueError):
    """A reference is not `name`, `name@latest`, `name@N`, `name@tag`, `name@hash`, `name@seed`."""


class ProfileValidationError(RegistryError, ValueError):
    """A profile breaks the schema (bad knob, head outside the model, non-finite score …)."""


class ProfileCorrupted(RegistryError):
    """A stored file no longer matches its checksum, or cannot be parsed. `path` names the file."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ProfileMismatchError(RegistryError):
    """A profile was made for a different model than the one it is being applied to."""


class UnsafeArchiveError(RegistryError):
    """An archive holds what `import` refuses: absolute paths, `..`, links, unexpected files."""
