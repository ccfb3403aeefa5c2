"""Error types. Every error names the file, tensor or parameter at fault and says what would fix it."""

from __future__ import annotations


class MergeError(ValueError):
    """Base class for every error lightning_merge raises on bad input."""


class ConfigError(MergeError):
    """A method, hyperparameter or configuration value is unknown or out of range."""


class SourceError(MergeError):
    """A checkpoint, adapter or file cannot be read, or does not fit the base model."""


class IncompatibleTensorError(SourceError):
    """Tensors that should merge elementwise do not match (shape, architecture, NaN/Inf)."""
