"""Every exception patchlab raises on purpose. Each message says what was wrong, where, and what to do.

The CLI maps every ``PatchlabError`` to a one-line message and a non-zero exit code. Where a builtin
exception means the same thing, the class is one too (``CheckpointNotFoundError`` is a
``FileNotFoundError``, request errors are ``ValueError``s), so callers may catch either.
"""

from __future__ import annotations


class PatchlabError(Exception):
    """Base class of every error patchlab raises on purpose."""

    exit_code = 1


# ---- checkpoints and patches on disk ------------------------------------------------------------------
class CheckpointNotFoundError(PatchlabError, FileNotFoundError):
    """A checkpoint directory, weight file or index is missing."""


class CorruptCheckpointError(PatchlabError, ValueError):
    """A weight file is truncated, has a bad header, or its index points at nothing."""


class UnsupportedDtypeError(PatchlabError, TypeError):
    """A tensor has a dtype patchlab cannot read or write."""


class PatchFormatError(PatchlabError, ValueError):
    """A patch directory is missing, damaged, or of an unknown format version."""


class PeftAdapterError(PatchFormatError):
    """A PEFT adapter directory is missing files, or its config and tensors disagree."""


class UnsupportedAdapterError(PatchlabError, ValueError):
    """The adapter is valid PEFT but not a plain LoRA patchlab can turn into ΔW (DoRA, LoHa, IA3...)."""


class ModelLoadError(PatchlabError, ValueError):
    """A model directory cannot be loaded as a transformers model (config, tokenizer or weights)."""


# ---- plans and transfers ---------------------------------------------------------------------------
class IncompatiblePatchError(PatchlabError, ValueError):
    """A patch does not fit the checkpoint it is applied or ported to."""


class PlanError(PatchlabError, ValueError):
    """A plan found problems it will not resolve silently; the message names the option that would."""


class UnknownDigestError(PatchlabError, ValueError):
    """A recorded content fingerprint is in a format (hash algorithm) this version of patchlab does not know."""


class NonFiniteError(PatchlabError, ValueError):
    """A tensor read or produced holds NaN or Inf (the message names it and the option that allows it)."""


class NonFiniteDeltaError(NonFiniteError):
    """A delta contains NaN or Inf."""


class LowRankError(PatchlabError, ValueError):
    """A low-rank request cannot be met (rank too large, energy outside (0, 1], budget too small...)."""


class SparseError(PatchlabError, ValueError):
    """A sparse request cannot be met (density outside (0, 1], inconsistent indices...)."""


class MergeConfigError(PatchlabError, ValueError):
    """A merge method or parameter is unknown, out of range, or does not match the number of patches."""


# ---- model edits (LocFT-BF) ---------------------------------------------------------------------------
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


# ---- outputs and devices ---------------------------------------------------------------------------
class OutputExistsError(PatchlabError, FileExistsError):
    """The output directory exists and ``overwrite`` was not given."""


class UnsafeOutputError(OutputExistsError):
    """The output may not be written or replaced: the current directory or a parent of it, the registry
    home, a registered model's directory, or a directory patchlab did not write (or of another kind)."""


class NoSpaceError(PatchlabError, OSError):
    """The output's file system has less free space than the output needs."""


class DeviceError(PatchlabError, RuntimeError):
    """The requested compute device is not available."""


# ---- measurements ----------------------------------------------------------------------------------
class TaskFormatError(PatchlabError, ValueError):
    """A task file or one of its instances is malformed or of an unknown type."""


class PromptTooLongError(PatchlabError, ValueError):
    """A prompt (plus its continuation or generation budget) does not fit the model's context."""


class LMEvalFormatError(PatchlabError, ValueError):
    """A file is not an lm-evaluation-harness samples file patchlab can read."""


class ResultsMismatchError(PatchlabError, ValueError):
    """Two result sets cannot be compared instance by instance as given."""


class IncompatibleModelsError(PatchlabError, ValueError):
    """Two models cannot be compared layer by layer (different depth, width or layout)."""


class GateExpressionError(PatchlabError, ValueError):
    """A gate expression (``nfr <= 0.05``) does not parse or does not type-check; the message gives the position."""


# ---- the Hugging Face Hub ----------------------------------------------------------------------------
class HubError(PatchlabError):
    """A Hub operation failed; ``repo_id`` names the repo (when there is one)."""

    def __init__(self, message: str, repo_id: str | None = None):
        super().__init__(message)
        self.repo_id = repo_id


class InvalidRepoIdError(HubError, ValueError):
    """A Hub repo id is malformed (it must be ``name`` or ``org/name`` with letters, digits, ``-_.``)."""


class HubRepoNotFoundError(HubError, LookupError):
    """The repo does not exist, or it is private or gated and the token cannot see it."""


class HubRevisionNotFoundError(HubError, LookupError):
    """The repo exists but the branch, tag or commit does not (or is not a branch where one is needed)."""


class HubFileNotFoundError(HubError, FileNotFoundError):
    """A file asked for is not in the repo at that revision."""


class HubAuthError(HubError, PermissionError):
    """The Hub refused the token (401) or the token lacks the permission (403), or the repo is gated."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub could not be reached (network down, DNS, timeout, refused connection)."""


class HubServerError(HubError):
    """The Hub answered with an unexpected HTTP error (5xx or another status); ``status`` holds it."""

    def __init__(self, message: str, repo_id: str | None = None, status: int | None = None):
        super().__init__(message, repo_id)
        self.status = status


class HubOfflineError(HubError, FileNotFoundError):
    """Offline (``HF_HUB_OFFLINE=1``) and what was asked for is not complete in the local cache."""


class HubDownloadError(HubError, OSError):
    """A download was interrupted or arrived incomplete; nothing partial was kept at the destination."""


class RemoteHeadMovedError(HubError):
    """The branch's head is no longer the commit a push was based on (someone pushed in between)."""


class HubCardRejectedError(HubError, ValueError):
    """The Hub rejected the model card's metadata (README.md front matter)."""


class HubPushSourceError(HubError, FileNotFoundError):
    """The folder to push is missing, not a directory, or holds no files."""
