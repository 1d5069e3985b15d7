"""Exception types. Each message says what was wrong, where, and what to do about it.

The CLI maps every ``PatchlabError`` to a one-line message and a non-zero exit code.
"""

from __future__ import annotations


class PatchlabError(Exception):
    """Base class of every error patchlab raises on purpose."""

    exit_code = 1


class CheckpointNotFoundError(PatchlabError):
    """A checkpoint directory, weight file or index is missing."""


class CorruptCheckpointError(PatchlabError):
    """A weight file is truncated, has a bad header, or its index points at nothing."""


class UnsupportedDtypeError(PatchlabError):
    """A tensor has a dtype patchlab cannot read or write."""


class PatchFormatError(PatchlabError):
    """A patch directory is missing, damaged, or of an unknown format version."""


class IncompatiblePatchError(PatchlabError):
    """A patch does not fit the checkpoint it is applied or ported to."""


class PlanError(PatchlabError):
    """A plan found problems it will not resolve silently; the message names the option that would."""


class NonFiniteDeltaError(PatchlabError):
    """A delta contains NaN or Inf."""


class OutputExistsError(PatchlabError):
    """The output directory exists and ``overwrite`` was not given."""


class NoSpaceError(PatchlabError):
    """The output's file system has less free space than the output needs."""


class DeviceError(PatchlabError):
    """The requested compute device is not available."""


# ---- Model editing (LocFT-BF): added with patchlab/locft.py --------------------------------------------


class EditError(PatchlabError):
    """Base class of the errors raised when validating or training a set of fact edits."""


class EditFormatError(EditError):
    """An edit file or one of its lines is malformed (the message names the line)."""


class EmptyTargetError(EditFormatError):
    """An edit's target is empty or blank, so there is nothing to train on."""


class EditTooLongError(EditError):
    """An edit's prompt (plus its target or generation budget) does not fit the model's context."""


class EditLocationError(EditError):
    """The layer or module to train does not exist in the model; the message lists the valid ones."""


class UnsupportedArchitectureError(EditError):
    """The model is not a decoder-only causal LM, which LocFT-BF needs."""
