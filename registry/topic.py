"""What every topic of ``Registry`` (bases, patches, derived, lineage, labels, evaluations, maintenance)
shares: the attributes a topic mixin relies on, and small helpers over a session."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.blobs import BlobStore
from registry.db import Database, Location
from registry.errors import InvalidReferenceError
from registry.rows import BaseVersionRow, FamilyRow, PatchRow


class Topic:
    """Base of the topic mixins ``Registry`` is made of; ``Registry.__init__`` sets these."""

    location: Location
    db: Database
    home: Path
    blobs: BlobStore
    cache: Path
    hub_endpoint: str | None  # None: huggingface_hub's (HF_ENDPOINT or https://huggingface.co)
    hub_token: str | None  # None: huggingface_hub's usual places (HF_TOKEN, `hf auth login`)
    hub_progress: bool | type  # download progress: none, the client's bars, or a tqdm class to draw them


def json_safe(value: Any, what: str) -> Any:
    """``value`` unchanged if it can be stored as JSON, else an error naming ``what``."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidReferenceError(f"{what} must be JSON-serialisable: {exc}") from None
    return value


def group(pairs: Iterable[tuple[Any, Any]]) -> dict[Any, list[Any]]:
    """``[(key, value), ...]`` -> ``{key: [values]}``."""
    out: dict[Any, list[Any]] = defaultdict(list)
    for k, v in pairs:
        out[k].append(v)
    return out


def target_label(s: Session, base_id: int | None, patch_id: int | None) -> str:
    """``name@version`` of a patch id, else ``family@version`` of a base version id."""
    if patch_id is not None:
        n, v = s.execute(select(PatchRow.name, PatchRow.version).where(PatchRow.id == patch_id)).one()
        return f"{n}@{v}"
    f, v = s.execute(
        select(FamilyRow.name, BaseVersionRow.version)
        .join(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
        .where(BaseVersionRow.id == base_id)
    ).one()
    return f"{f}@{v}"
