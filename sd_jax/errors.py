"""Exceptions raised when a checkpoint or an input cannot be used as given.

Every message names the file, key, shape or value at fault and what to do.
"""


class SDJaxError(Exception):
    """Base class of every error sd-jax raises on purpose."""


class CheckpointError(SDJaxError, ValueError):
    """A checkpoint could not be loaded completely and exactly."""


class UnexpectedKeyError(CheckpointError):
    """A checkpoint tensor maps to no parameter of ours."""


class MissingParameterError(CheckpointError):
    """A parameter of ours was left unfilled by the checkpoint."""


class ShapeMismatchError(CheckpointError):
    """A checkpoint tensor has a different shape than our parameter."""


class MissingComponentError(CheckpointError, FileNotFoundError):
    """A component folder or file that the model index names is absent."""


class CorruptCheckpointError(CheckpointError):
    """A weights file could not be parsed."""


class UnsupportedArchitectureError(CheckpointError):
    """A config asks for an architecture feature we do not implement."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint was refused because loading it can execute code."""
