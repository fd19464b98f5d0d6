"""Errors the runtime raises for bad input, each naming the input and what was expected."""

from __future__ import annotations


class LowmemError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2."""


class InputError(LowmemError, ValueError):
    """An input file or text is not what the runtime accepts."""


class ModelSourceError(LowmemError, ValueError):
    """A model path or hub id cannot be loaded."""


class OutputError(LowmemError, ValueError):
    """An output path cannot be written."""


class TextTooLongError(InputError):
    """A text is longer than max_length tokens and truncation is off."""

    def __init__(self, index: int, n_tokens: int, max_length: int) -> None:
        self.index = index
        self.n_tokens = n_tokens
        self.max_length = max_length
        super().__init__(
            f"text #{index} has {n_tokens} tokens with BOS and EOS, more than max_length={max_length}; "
            "raise max_length or allow truncation"
        )


class ResumeMismatchError(LowmemError):
    """A partial run on disk was made with other inputs or settings."""


class OutOfMemoryError(LowmemError):
    """A single row does not fit on the device even alone."""
