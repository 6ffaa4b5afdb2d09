"""Errors for configs and checkpoints the user gave us; each message names the file, key or tensor at fault.
Both are `InputError`s (residscope.common.errors, re-exported here with `MissingFileError`): bad input, exit code 2."""

from residscope.common.errors import InputError, MissingFileError

__all__ = ["CheckpointError", "ConfigError", "InputError", "MissingFileError"]


class CheckpointError(InputError):
    """A checkpoint folder or file that cannot be loaded as asked (missing file, missing or mis-shaped tensor, bad dtype)."""


class ConfigError(InputError):
    """A config.json that residscope cannot reproduce exactly."""
