"""``patchlab watch FAMILY --dir PATH`` / ``--hub org/repo [--branch B | --tags PATTERN]``: notice new
releases (a new directory; a new commit on the branch; a new tag matching the pattern), register each as the
family's next base version and run the upgrade. The releases a watch has seen are stored in the registry
(``watches``), and a release counts as seen only once its upgrade finished, so a restart never re-triggers a
finished one and always resumes an interrupted one."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.api import Registry
from registry.workflows.upgrade import UpgradeError, UpgradeResult, run_upgrade

NOTHING_NEW_EXIT = 0
NEW_ALL_PASSED_EXIT = 10
NEW_SOME_FAILED_EXIT = 11


@dataclass
class WatchResult:
    found: list[str] = field(default_factory=list)
    upgrades: list[UpgradeResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def all_passed(self) -> bool:
        return all(u.all_passed for u in self.upgrades)

    @property
    def exit_code(self) -> int:
        if not self.found:
            return NOTHING_NEW_EXIT
        return NEW_ALL_PASSED_EXIT if self.all_passed else NEW_SOME_FAILED_EXIT


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def release_dirs(path: Path) -> list[Path]:
    """Model directories directly under ``path`` (they hold a config.json), in natural name order."""
    if not path.is_dir():
        raise UpgradeError(f"watched directory {path} does not exist")
    return sorted((p for p in path.iterdir() if (p / "config.json").is_file()), key=lambda p: _natural(p.name))


def parse_interval(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m:
        raise UpgradeError(f"cannot read interval {text!r}; write e.g. 30s, 15m, 1h or 1d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def watch_dir_once(
    reg: Registry, family: str, directory: Path, *, log: Callable[[str], None] = lambda s: None, **upgrade_kw: Any
) -> WatchResult:
    """One look at ``directory``: every release directory not seen yet is registered (version = its name) and
    upgraded to, oldest first."""
    directory = directory.expanduser().resolve()
    source = f"dir:{directory}"
    _, seen = reg.watch_seen(family, source)
    known = {b.version: b for b in reg.list_bases(family)} if _family_exists(reg, family) else {}
    result = WatchResult()
    for rel in release_dirs(directory):
        if rel.name in seen:
            continue
        have = known.get(rel.name)
        if have is not None and Path(have.source) != rel:
            raise UpgradeError(
                f"{family}@{rel.name} is already registered from {have.source}, not {rel}; rename the release directory"
            )
        if have is None and any(Path(b.source) == rel for b in known.values()):
            seen.append(rel.name)  # registered by hand under another label: nothing new
            reg.record_watch(family, source, rel.name)
            continue
        result.found.append(rel.name)
        if have is None:
            log(f"new release {rel.name} in {directory}: registering {family}@{rel.name}")
            reg.add_base(family, rel.name, rel)
        older = [b for b in reg.list_bases(family) if b.version != rel.name]
        if older:
            try:
                result.upgrades.append(run_upgrade(reg, family, rel.name, log=log, **upgrade_kw))
            except UpgradeError as exc:
                if "nothing to upgrade" not in str(exc) and "has no patches" not in str(exc):
                    raise
                result.notes.append(f"{family}@{rel.name}: {exc}")
        else:
            result.notes.append(f"{family}@{rel.name} is the family's first release: nothing to upgrade")
        reg.record_watch(family, source, rel.name)  # only once its upgrade finished
    return result


def _family_exists(reg: Registry, family: str) -> bool:
    return any(b.family == family for b in reg.list_bases())


def watch_hub_once(
    reg: Registry,
    family: str,
    repo: str,
    *,
    branch: str | None = None,
    tags: str | None = None,
    log: Callable[[str], None] = lambda s: None,
    **upgrade_kw: Any,
) -> WatchResult:
    """One look at Hub repo ``repo`` (through ``patchlab.io.hub``, at the registry's endpoint): with ``tags``, every
    tag matching the glob not seen yet is a release (version = the tag), oldest name first; else the head of
    ``branch`` (default ``main``): a commit not seen yet is a release (version = the first 12 hex of its sha).
    Each is registered (``add_base`` with the repo and the commit sha) and upgraded to; the watch remembers it
    once its upgrade finished. A release already registered by hand (same repo and sha) counts as seen."""
    from patchlab.io import hub

    if branch and tags:
        raise UpgradeError("watch a branch or tags, not both")
    source = f"hub:{repo}#tags={tags}" if tags else f"hub:{repo}#branch={branch or 'main'}"
    if tags:
        found = hub.list_tags(repo, endpoint=reg.hub_endpoint, token=reg.hub_token)
        releases = [(t, found[t]) for t in sorted(found, key=_natural) if fnmatch.fnmatchcase(t, tags)]
    else:
        sha = hub.resolve_revision(repo, branch or "main", endpoint=reg.hub_endpoint, token=reg.hub_token)
        releases = [(sha[:12], sha)]
    _, seen = reg.watch_seen(family, source)
    known = reg.list_bases(family) if _family_exists(reg, family) else []
    result = WatchResult()
    for version, sha in releases:
        key = version if tags else sha
        if key in seen:
            continue
        same = next((b for b in known if b.source == repo and b.revision == sha), None)
        if same is not None and same.version != version:  # registered under another label: nothing new
            reg.record_watch(family, source, key)
            continue
        have = next((b for b in known if b.version == version), None)
        if have is not None and (have.source != repo or have.revision != sha):
            raise UpgradeError(
                f"{family}@{version} is already registered from {have.source}@{have.revision}, not {repo}@{sha}"
            )
        result.found.append(version)
        if have is None:
            where = f"tag {version}" if tags else f"branch {branch or 'main'}"
            log(f"new release {repo}@{sha[:12]} ({where}): registering {family}@{version}")
            reg.add_base(family, version, repo, revision=sha)
        _upgrade_to(reg, family, version, result, log, upgrade_kw)
        reg.record_watch(family, source, key)  # only once its upgrade finished
    return result


def _upgrade_to(
    reg: Registry, family: str, version: str, result: WatchResult, log: Callable[[str], None], upgrade_kw: Any
) -> None:
    if [b for b in reg.list_bases(family) if b.version != version]:
        try:
            result.upgrades.append(run_upgrade(reg, family, version, log=log, **upgrade_kw))
        except UpgradeError as exc:
            if not any(k in str(exc) for k in ("nothing to upgrade", "has no patches", "not newer than")):
                raise
            result.notes.append(f"{family}@{version}: {exc}")
    else:
        result.notes.append(f"{family}@{version} is the family's first release: nothing to upgrade")
