"""Errors raised while reading checkpoints: each message names the file or tensor key at fault."""


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as asked (missing file, missing or mis-shaped tensor, bad dtype)."""
