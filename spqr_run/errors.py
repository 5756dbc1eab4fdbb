"""User-facing errors: one clear line naming the file, field or parameter that is wrong.

CLIs catch `SpqrError`, print its message on one line and exit with status 2; anything else is a bug.
"""

from __future__ import annotations


class SpqrError(Exception):
    """Base class of errors caused by user input (files, flags, requests), never by a bug."""


class ModelFormatError(SpqrError):
    """A model file or folder is missing, corrupt, truncated, foreign or unsupported."""


class ConfigError(SpqrError):
    """A command-line flag or request parameter has an invalid value."""
