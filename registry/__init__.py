"""patchlab registry: base versions, patches, lineage, aliases, tags and evaluations over SQLAlchemy,
with a content-addressed blob store. ``Registry`` is the entry point."""

from registry.api import Registry
from registry.errors import (
    AlreadyExistsError,
    AmbiguousReferenceError,
    BlobCorruptError,
    BlobError,
    BlobNotFoundError,
    DependencyError,
    InvalidReferenceError,
    ManifestError,
    RegistryError,
    RegistryNotFoundError,
    RegistrySchemaError,
    UnknownReferenceError,
)
from registry.records import (
    AliasInfo,
    BaseInfo,
    BlobProblem,
    DerivedInfo,
    EvaluationInfo,
    GcReport,
    LineageNode,
    PatchInfo,
    PushInfo,
    VerifyReport,
)
from registry.refs import Target

__all__ = [
    "AliasInfo",
    "AlreadyExistsError",
    "AmbiguousReferenceError",
    "BaseInfo",
    "BlobCorruptError",
    "BlobError",
    "BlobProblem",
    "BlobNotFoundError",
    "DependencyError",
    "DerivedInfo",
    "EvaluationInfo",
    "GcReport",
    "InvalidReferenceError",
    "LineageNode",
    "ManifestError",
    "PatchInfo",
    "PushInfo",
    "Registry",
    "RegistryError",
    "RegistryNotFoundError",
    "RegistrySchemaError",
    "Target",
    "UnknownReferenceError",
    "VerifyReport",
]
