"""Registry exception types. Each message says what was wrong and what to do about it."""

from __future__ import annotations

from patchlab.errors import PatchFormatError, PatchlabError


class RegistryError(PatchlabError):
    """Base class of every error the registry raises on purpose."""


class RegistryNotFoundError(RegistryError):
    """No registry exists at the location given (run ``patchlab init``)."""


class RegistryConnectionError(RegistryError):
    """The registry's database cannot be reached: a malformed URL, a driver that is not installed
    (``pip install 'patchlab[postgres]'``), or a server that is down or refuses the connection."""


class RegistrySchemaError(RegistryError):
    """The registry's schema was made by a newer patchlab, or is not a patchlab registry."""


class ReferenceError_(RegistryError):
    """Base class of reference problems (kept out of the builtin ``ReferenceError`` namespace)."""


class UnknownReferenceError(ReferenceError_):
    """A reference names nothing in the registry; the message lists close matches."""


class AmbiguousReferenceError(ReferenceError_):
    """A reference matches more than one entry; the message lists the candidates."""


class InvalidReferenceError(ReferenceError_):
    """A reference is malformed (e.g. an empty name or a too-short digest prefix)."""


class BaseChangedError(RegistryError):
    """A registered local base's files changed (or vanished) since registration."""


class AlreadyExistsError(RegistryError):
    """An entry with this identity already exists."""


class DependencyError(RegistryError):
    """An entry cannot be removed because others depend on it (pass ``cascade`` to remove them too)."""


class BlobError(RegistryError):
    """Base class of blob-store problems."""


class BlobNotFoundError(BlobError):
    """A blob the registry refers to is missing from the store (run ``patchlab verify``)."""


class BlobCorruptError(BlobError):
    """A blob's bytes no longer hash to its digest (run ``patchlab verify``)."""


class ManifestError(RegistryError, PatchFormatError):
    """A patch directory's ``patch.json`` is missing or lacks what the registry needs."""
