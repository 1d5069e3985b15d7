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


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub errors (raised by patchlab.hub_io, the one module that talks to the Hub).
# Each message is one line that names the repo and says what to do.
# ---------------------------------------------------------------------------------------------------------------


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
