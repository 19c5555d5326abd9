"""One error family for everything a user can cause.

Library code raises these; only ``cli.py`` turns them into a one-line message
and exit code 2.
"""


class ManifoldGDError(Exception):
    """Base class: a problem the user can act on (bad input, bad config)."""


class ConfigError(ManifoldGDError, ValueError):
    """A parameter is out of range or unknown; the message names it."""


class DataError(ManifoldGDError):
    """The image folder, a class or a file is missing, empty or unreadable."""


class ModelError(ManifoldGDError):
    """A model or VAE cannot be found or loaded, or its files are damaged."""


class BackendError(ManifoldGDError, RuntimeError):
    """A forced backend cannot take the given input (shape, dtype, device)."""
