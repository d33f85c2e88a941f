"""Exceptions that name what went wrong and where, so a user can fix the input."""


class BabelforgeError(Exception):
    """Base class for errors raised by babelforge with a user-facing message."""


class ConfigError(BabelforgeError, ValueError):
    """A configuration file or override is invalid; the message names the key."""


class ModelLoadError(BabelforgeError, OSError):
    """A model directory or hub id could not be loaded; the message names the path or file."""


class DataFormatError(BabelforgeError, ValueError):
    """An input file is malformed; the message names the file, line and field."""


class StageNotAvailableError(BabelforgeError, NotImplementedError):
    """A pipeline stage that this version of babelforge does not provide yet."""


class ModelExistsError(BabelforgeError, FileExistsError):
    """An output model directory already holds files and overwriting was not asked for."""
