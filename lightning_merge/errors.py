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


class OutputError(ConfigError):
    """The output cannot be written there: it is an input, its location is not writable, the disk is
    full, another run is writing it, or a write failed midway (the partial output is removed)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived while lightning_merge was writing; the partial output was
    removed. ``signum`` is the signal's number (the command exits with ``128 + signum``)."""

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")


#: Python-API spellings in messages -> the command line's flags (used by ``cli_message``)
_CLI_SPELLINGS = (
    ("pass overwrite=True", "pass --overwrite"),
    ("overwrite=True", "--overwrite"),
    ("adapter_rank=", "--adapter-rank "),
    ("out_dtype=", "--out-dtype "),
    ("out_format=", "--format "),
)


def cli_message(err: BaseException) -> str:
    """``err``'s message on one line, with Python argument names replaced by the command's flags."""
    text = " ".join(str(err).split())
    for py, cli in _CLI_SPELLINGS:
        text = text.replace(py, cli)
    return text
