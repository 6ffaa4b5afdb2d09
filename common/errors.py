"""residscope's errors for user mistakes. Each message names the file, key or argument at fault, in one line.

    InputError(ValueError)                  any bad input: argument, value, text file, output path
    ├── ConfigError                         a config.json residscope cannot reproduce exactly   (residscope.model.errors)
    ├── CheckpointError                     a checkpoint that cannot be loaded as asked         (residscope.model.errors)
    └── MissingFileError(FileNotFoundError) a file, folder or alias that does not exist

The CLI turns exactly these into one line on stderr and exit code 2; any other exception is a bug and keeps its
traceback (exit code 1). They subclass ValueError, so `except ValueError` in user code keeps working.
"""


class InputError(ValueError):
    """A user mistake: a bad argument, value, file, key or output path. The message names it."""


class MissingFileError(InputError, FileNotFoundError):
    """A file, folder or model alias that does not exist (also a FileNotFoundError)."""
