"""The errors nn-core raises: each names the argument and what was allowed.

Every error about a value the caller passed is a ``ValueError`` subclass, so
``except ValueError`` catches all of them; the subclasses let a program (the
CLI, a test) tell a bad config from bad token ids or a corrupt checkpoint.
"""

from __future__ import annotations


class NNCoreError(Exception):
    """Base class of every error raised by nn-core itself."""


class ConfigError(NNCoreError, ValueError):
    """A config field (model, training, sampling) is out of its allowed range."""


class InputError(NNCoreError, ValueError):
    """An array passed to the model has the wrong dtype, shape or values."""


class CheckpointError(NNCoreError, ValueError):
    """A checkpoint or weight file is missing, corrupt, or of another config."""


class NonFiniteError(NNCoreError, FloatingPointError):
    """A loss or gradient norm became NaN or Inf during training."""


class OutputError(NNCoreError, ValueError):
    """An output path is refused: writing there would replace something nn-core does not
    own (or replaces only with ``overwrite=True`` / ``--force``), its parent directory is
    missing, or it is not writable. Nothing was written."""


class InUseError(NNCoreError, RuntimeError):
    """A resource has another user right now: a run directory locked by another writer
    process, or a model's gradient buffer in use by another thread."""
