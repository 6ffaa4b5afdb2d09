"""Errors raised while reading configs and checkpoints: each message names the file, key or tensor at fault."""


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as asked (missing file, missing or mis-shaped tensor, bad dtype)."""


class ConfigError(ValueError):
    """A config.json that residscope cannot reproduce exactly."""
