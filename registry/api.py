"""``Registry``: the Python API over the registry database and blob store (the CLI is a thin shell on it).

``Registry`` is a facade: each topic lives in its own module as a mixin (``registry.bases``, ``patches``,
``derived``, ``lineage``, ``labels``, ``evaluations``, ``pushes``, ``maintenance``, ``upgrades``) over the
attributes set here.
"""

from __future__ import annotations

import os
from pathlib import Path

from registry import refs
from registry.bases import Bases
from registry.blobs import BlobStore
from registry.db import Database, Location, open_database, resolve_location
from registry.derived import Derived, derived_infos
from registry.drifts import Drifts
from registry.errors import InvalidReferenceError
from registry.evaluations import Evaluations
from registry.labels import Labels
from registry.lineage import Lineage
from registry.maintenance import Maintenance
from registry.outputs import Outputs
from registry.patches import Patches
from registry.pushes import Pushes
from registry.upgrades import Upgrades


class Registry(Bases, Drifts, Patches, Derived, Lineage, Labels, Evaluations, Pushes, Maintenance, Upgrades, Outputs):
    """A registry of base versions, patches, derived models, aliases, tags and evaluations.

    ``Registry()`` opens the default registry (``$PATCHLAB_HOME`` or the user data dir); pass a directory,
    a ``.db`` file or a SQLAlchemy URL to open another. ``create=True`` (or :meth:`init`) makes it if absent.
    ``hub_endpoint`` names the Hugging Face Hub to talk to (default: ``huggingface_hub``'s); tokens come from
    ``huggingface_hub``'s usual places only.
    Opening a registry made by an older patchlab upgrades its schema; a newer one is refused.
    """

    def __init__(
        self,
        url_or_path: str | os.PathLike[str] | None = None,
        *,
        create: bool = False,
        hub_endpoint: str | None = None,
        hub_progress: bool | type = False,
    ) -> None:
        self.hub_endpoint = hub_endpoint
        self.hub_token: str | None = None
        self.hub_progress = hub_progress
        self.location: Location = resolve_location(url_or_path)
        self.db: Database = open_database(self.location, create=create)
        self.home: Path = self.location.home
        self.blobs = BlobStore(self.home / "blobs", stamps=not self.location.read_only)
        self.cache = self.home / "cache"

    @classmethod
    def init(cls, url_or_path: str | os.PathLike[str] | None = None) -> Registry:
        """Create the registry (idempotent: an existing one is opened, and upgraded if older)."""
        reg = cls(url_or_path, create=True)
        reg.blobs.objects.mkdir(parents=True, exist_ok=True)
        return reg

    def close(self) -> None:
        self.db.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.location.url!r})"

    # ---- references across topics --------------------------------------------------------------------

    def resolve(self, ref: str, *, kind: str | None = None) -> refs.Target:
        """What ``ref`` names: a patch, a base version or a derived model (``kind`` restricts the search)."""
        with self.db.read() as s:
            return refs.resolve_any(s, ref, kind)

    def model_path(self, ref: str) -> tuple[Path, str]:
        """A model directory for a base version (family@version) or a derived model (derived:N), with its
        canonical label. A patch is refused: it is not a model."""
        with self.db.read() as s:
            t = refs.resolve_any(s, ref, None)
            derived = derived_infos(s, [t.id])[0] if t.kind == "derived" else None
        if t.kind == "base":
            return self.checkpoint_path(t.label), t.label
        if derived is not None:
            return Path(derived.path), t.label
        raise InvalidReferenceError(
            f"{ref!r} is a patch, not a model; evaluate the model it makes: `patchlab apply {ref} BASE OUT` "
            "(or `patchlab port`), then `patchlab eval derived:N ...`"
        )
