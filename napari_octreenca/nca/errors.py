"""Exceptions raised by the engine. Each message says what was wrong and what to do."""

from __future__ import annotations


class OctreeNCAError(Exception):
    """Base class for all napari-octreenca errors."""


class ConfigError(OctreeNCAError, ValueError):
    """A model or training configuration is invalid."""


class InputError(OctreeNCAError, ValueError):
    """An input image has the wrong shape, channels or values."""


class ModelFileError(OctreeNCAError):
    """A model file is corrupt, truncated, of the wrong version or does not match its config."""


class Cancelled(OctreeNCAError):
    """A long-running job was cancelled by the user."""


class BackendUnavailable(OctreeNCAError, RuntimeError):
    """A requested compute backend cannot run on this machine."""


class OctreeNCAWarning(UserWarning):
    """Something the user should know about an input (e.g. a dropped alpha channel); the run goes on."""
