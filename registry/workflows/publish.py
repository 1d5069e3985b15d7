"""Publishing to the Hugging Face Hub: the choices (bytes go through ``patchlab.io.hub``).

- ``push``: what to push for a registered patch or derived model (``patch``: the stored patch directory, manifest
  and shards, so ``pull`` registers it again with its provenance; ``peft``: a low-rank patch exported as a PEFT
  LoRA adapter; ``model``: a derived model directory), the model card made from what the registry holds
  (base, lineage, evaluations and negative flips against the previous version, the compatibility verdict of a
  report), one commit based on the last push recorded for that repo and branch, and the push recorded.
- ``pull``: a pushed patch (or a PEFT adapter, imported as a low-rank patch) downloaded and registered, after its
  base fingerprint is matched to a registered base. Everything is downloaded into a temporary directory under
  the registry's cache that is removed whatever happens; the patch row is written in one transaction at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchlab.digests import short_digest
from patchlab.errors import PatchlabError, RemoteHeadMovedError
from patchlab.io import hub
from registry.api import Registry
from registry.errors import InvalidReferenceError, UnknownReferenceError
from registry.patches import MANIFEST, read_manifest
from registry.pushes import PUSH_KINDS
from registry.records import BaseInfo, DerivedInfo, LineageNode, PatchInfo, PushInfo

README = "README.md"
PULL_SKIP = (README, ".gitattributes")


@dataclass(frozen=True)
class PushOutcome:
    """What ``push`` did: the recorded push (None when nothing was recorded), the Hub's answer and the card."""

    push: PushInfo | None
    result: hub.PushResult
    kind: str
    source: str  # the patch (name@version) or derived model (derived:N) pushed
    card: str


@dataclass(frozen=True)
class PullOutcome:
    patch: PatchInfo
    repo_id: str
    commit_sha: str
    kind: str  # "patch" | "peft"


# ---- push -----------------------------------------------------------------------------------------------------


def push(
    reg: Registry,
    ref: str,
    repo_id: str,
    *,
    as_: str | None = None,
    revision: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    force: bool = False,
    report: str | Path | None = None,
) -> PushOutcome:
    """Push a registered patch or derived model ``ref`` to ``repo_id`` as ONE commit with a model card.

    ``as_``: ``patch`` (default for a patch), ``peft`` or ``model`` (default for ``derived:N``; for a patch, its
    newest derived model). Refuses with ``RemoteHeadMovedError`` when the branch head is not the commit of the
    last push recorded here for that repo and branch, unless ``force``. Pushing what the repo already holds makes
    no commit (``result.created_commit`` is False). ``report``: a compatibility report (``report.json`` or its
    directory) whose verdict goes on the card.
    """
    hub.validate_repo_id(repo_id)
    if as_ is not None and as_ not in PUSH_KINDS:
        raise InvalidReferenceError(f"--as must be one of {', '.join(PUSH_KINDS)}, not {as_!r}")
    verdict = read_verdict(report) if report is not None else None
    target = reg.resolve(ref)
    if target.kind == "base":
        raise InvalidReferenceError(
            f"{ref} is a base version: push a patch (--as patch or peft) or a derived model (--as model); "
            "a base is added from the Hub with `patchlab base add`"
        )
    derived: DerivedInfo | None = None
    if target.kind == "derived":
        derived = reg.get_derived(target.label)
        kind = as_ or "model"
        if kind != "model":
            raise InvalidReferenceError(
                f"{derived.ref} is a model: push it --as model, or push its patch {derived.patch} --as {kind}"
            )
        patch = reg.get_patch(derived.patch)
    else:
        patch = reg.get_patch(target.label)
        kind = as_ or "patch"
        if kind == "model":
            made = reg.list_derived(patch.ref)
            if not made:
                raise InvalidReferenceError(
                    f"patch {patch.ref} has no derived model to push --as model; make one with "
                    f"`patchlab apply {patch.ref} BASE OUT` or `patchlab port`, or push it --as patch"
                )
            derived = made[-1]
    source = derived.ref if derived is not None else patch.ref
    base_ref = (derived.base if derived is not None else None) or patch.base
    base = reg.get_base(base_ref) if base_ref else None
    endpoint = (reg.hub_endpoint or hub.default_endpoint()).rstrip("/")
    branch = revision or "main"

    with _scratch(reg, "push") as tmp:
        if kind == "patch":
            folder = reg.patch_path(patch.ref)
        elif kind == "peft":
            folder = _export_adapter(reg, patch, base, tmp / "adapter")
        else:
            assert derived is not None
            folder = Path(derived.path)
            if not folder.is_dir():
                raise InvalidReferenceError(
                    f"the directory of {derived.ref} ({folder}) is gone; re-create it (`patchlab {derived.kind} ...`) "
                    "or push its patch --as patch"
                )
        card = model_card(reg, repo_id, kind, patch, derived, base, verdict)
        last = None if force else reg.last_push(endpoint, repo_id, branch)
        try:
            result = hub.push_folder(
                folder,
                repo_id,
                commit_message=f"patchlab push {source} as {kind}",
                commit_description=f"Pushed with patchlab from {source}" + (f" (base {base.ref})" if base else ""),
                revision=branch,
                private=private,
                create_pr=create_pr,
                parent_commit=last.commit_sha if last is not None else None,
                card=card,
                endpoint=reg.hub_endpoint,
                token=reg.hub_token,
            )
        except RemoteHeadMovedError as e:
            since = f"since the last push recorded here ({last.commit_sha[:12]})" if last else "during the push"
            raise RemoteHeadMovedError(
                f"push to {repo_id}@{branch}: the branch moved {since}; someone else pushed: inspect it, then "
                "push again with --force to overwrite it (or --create-pr to propose the change)",
                repo_id,
            ) from e
    recorded = None
    if result.created_commit or last is None or last.commit_sha != result.commit_sha:
        recorded = reg.record_push(
            source,
            endpoint=endpoint,
            repo_id=repo_id,
            revision=result.revision,
            branch=branch,
            commit_sha=result.commit_sha,
            kind=kind,
            created_commit=result.created_commit,
        )
    return PushOutcome(recorded, result, kind, source, str(card))


def _export_adapter(reg: Registry, patch: PatchInfo, base: BaseInfo | None, out: Path) -> Path:
    from patchlab.methods.peft import export_peft  # lazy: torch

    if patch.encoding not in ("lowrank", "mixed"):
        raise InvalidReferenceError(
            f"patch {patch.ref} is {patch.encoding or 'not'} encoded, not low-rank: a PEFT adapter holds low-rank "
            f"modules; compress it first (`patchlab compress ... --rank R`, then `patchlab add`) or push it --as patch"
        )
    needs_base = patch.encoding == "mixed"
    if needs_base and base is None:
        raise InvalidReferenceError(
            f"patch {patch.ref} holds dense tensors and has no registered base to export them with; "
            "compress it to low rank first"
        )
    name = base.source if base is not None and base.source_kind == "hub" else (base.ref if base else None)
    return export_peft(
        reg.patch_path(patch.ref),
        out,
        base=reg.checkpoint_path(base.ref) if needs_base and base is not None else None,
        base_model_name_or_path=name,
    )


def model_card(
    reg: Registry,
    repo_id: str,
    kind: str,
    patch: PatchInfo,
    derived: DerivedInfo | None,
    base: BaseInfo | None,
    verdict: str | None,
) -> Any:
    """The model card of a push, from what the registry holds."""
    merged = any(rel == "merge" for _, rel in patch.parents) or "merge" in (patch.method or "")
    if derived is not None and "merge" in derived.kind:
        merged = True
    relation = "adapter" if kind == "peft" else ("merge" if merged else "finetune")
    hub_base = base.source if base is not None and base.source_kind == "hub" else None
    method = (derived.kind if derived is not None else None) or patch.method or "patch"
    tags = [kind, *(t for t in (patch.encoding,) if t and t != "mixed"), *patch.tags]
    what = {"patch": "a patchlab patch (manifest + shards)", "peft": "a PEFT LoRA adapter", "model": "a full model"}
    source = derived.ref if derived is not None else patch.ref
    description = f"Pushed with patchlab as {what[kind]}, from `{source}`."
    if kind == "patch":
        description += f" Register it again with `patchlab pull {repo_id}`."
    elif kind == "peft":
        description += f" Load it with PEFT, or register it as a low-rank patch with `patchlab pull {repo_id}`."
    return hub.build_model_card(
        name=repo_id.split("/")[-1],
        base_model=hub_base,
        relation=relation,  # type: ignore[arg-type]
        method=method,
        base_label=base.ref if base is not None else patch.base,
        base_fingerprint=(base.content if base is not None else None) or patch.base_content,
        lineage=lineage_lines(reg, patch, derived),
        evals=card_evals(reg, patch, derived),
        verdict=verdict,
        tags=tags,
        description=description,
        metadata={
            "kind": kind,
            "source": source,
            "patch": patch.ref,
            "name": patch.name,
            "digest": patch.digest,
            **({"base_hub": f"{base.source}@{base.revision}"} if hub_base and base and base.revision else {}),
        },
    )


def lineage_lines(reg: Registry, patch: PatchInfo, derived: DerivedInfo | None) -> list[str]:
    """The lineage, newest first, one readable line per step: ``<- port of task@1 on llama@3.0``."""
    out: list[str] = []
    depth0 = 0
    if derived is not None:
        out.append(f"{derived.ref}: {derived.kind} of {derived.patch} onto {derived.base or '?'}")
        depth0 = 1

    def walk(node: LineageNode, depth: int) -> None:
        rel = f"{node.relation} of " if node.relation else ""
        this = " (this patch)" if depth == depth0 and derived is None else ""
        out.append(f"{'<- ' * depth}{rel}{node.ref}{this} on {node.base or '?'}")
        for p in node.parents:
            walk(p, depth + 1)

    walk(reg.lineage(patch.ref), depth0)
    return out


def card_evals(reg: Registry, patch: PatchInfo, derived: DerivedInfo | None) -> list[hub.CardEval]:
    """Accuracy of the newest evaluation of each task of what is pushed, and the negative-flip rate against the
    previous version (the patch it was ported from) where both were evaluated on the same instances."""
    target = derived.ref if derived is not None else patch.ref
    newest: dict[str, Any] = {}
    for e in reg.list_evaluations(target):
        newest[e.dataset] = e
    out = [
        hub.CardEval(task, "accuracy", float(e.metrics["accuracy"]))
        for task, e in newest.items()
        if isinstance(e.metrics, dict) and isinstance(e.metrics.get("accuracy"), (int, float))
    ]
    if derived is not None:
        previous = derived.patch if derived.kind == "port" else None
    else:
        previous = next((r for r, rel in patch.parents if rel == "port"), None)
    if previous is None or not newest:
        return out
    from patchlab.measure.flips import compare  # lazy: measure imports torch

    try:
        old = reg.eval_result(previous).flip_records()
        new = reg.eval_result(target).flip_records()
        flips = compare(old, new, allow_missing=True)
    except PatchlabError:  # no stored evaluation of the previous version, or other instances
        return out
    for group, st in sorted(flips.groups.items()):
        if st.nfr is not None:
            out.append(hub.CardEval(group, "negative_flip_rate", float(st.nfr), against=previous))
    return out


def read_verdict(report: str | Path) -> str:
    """The verdict of a compatibility report (``patchlab report -o DIR``): ``level: reasons``."""
    path = Path(report)
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        v = data["diagnostics"]["verdict"]
        level, reasons = str(v["level"]), [str(r) for r in v.get("reasons") or []]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InvalidReferenceError(
            f"{path}: not a compatibility report with a verdict ({type(exc).__name__}); pass the report.json "
            "(or the directory) written by `patchlab report`"
        ) from None
    return f"{level}: " + "; ".join(reasons) if reasons else level


# ---- pull -----------------------------------------------------------------------------------------------------


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """``org/repo[@rev]`` -> (repo id, revision or None), checked."""
    repo_id, at, rev = spec.partition("@")
    if at and not rev.strip():
        raise InvalidReferenceError(f"{spec!r}: nothing after '@'; give a revision (branch, tag or sha) or drop '@'")
    hub.validate_repo_id(repo_id)
    return repo_id, (rev.strip() or None)


def pull(reg: Registry, spec: str, *, name: str | None = None) -> PullOutcome:
    """Download a pushed patch or PEFT adapter (``org/repo[@rev]``) and register it.

    A patch keeps its own manifest (provenance, statistics); its base fingerprint must match a registered base
    (a Hub base recorded lazily with the card's ``base_model`` is downloaded and fingerprinted to check). An
    adapter is imported as a low-rank patch on the registered base it names (card ``base_model`` or
    ``adapter_config.json``'s ``base_model_name_or_path``). Nothing is registered and nothing is kept on failure.
    """
    from registry.refs import validate_name

    repo_id, revision = parse_repo_spec(spec)
    if name is not None:
        validate_name(name)
    with _scratch(reg, "pull") as tmp:
        pulled = hub.download_folder(
            repo_id, revision, tmp / "repo", progress=reg.hub_progress, endpoint=reg.hub_endpoint, token=reg.hub_token
        )
        at = f"{repo_id}@{pulled.commit_sha[:12]}"
        meta = hub.card_metadata(pulled.path / README)
        info = meta.get("patchlab") if isinstance(meta.get("patchlab"), dict) else {}
        name = name or _default_name(info.get("name"), repo_id)
        description = f"pulled from {repo_id}@{pulled.commit_sha}"
        if (pulled.path / MANIFEST).is_file():
            kind = "patch"
            patch_dir = tmp / "patch"
            patch_dir.mkdir()
            for p in pulled.path.iterdir():
                if p.name not in PULL_SKIP and not p.name.startswith("."):
                    p.rename(patch_dir / p.name)
            manifest = read_manifest(patch_dir)
            # the manifest's own base fingerprint when the method recorded one, else the card's (the registered
            # base the patch was pushed from); the manifest's architecture digest is checked by add_patch too
            want = ((manifest.get("provenance") or {}).get("base") or {}).get("content") or info.get("base_fingerprint")
            base = _base_by_fingerprint(reg, want, meta, info, at)
            patch = reg.add_patch(patch_dir, name=name, base=base.ref, description=description)
        elif (pulled.path / "adapter_config.json").is_file():
            kind = "peft"
            base = _base_of_adapter(reg, pulled.path, meta, info, at)
            from patchlab.methods.peft import import_peft  # lazy: torch

            out = tmp / "patch"
            import_peft(pulled.path, reg.checkpoint_path(base.ref), out)
            _note_origin(out, f"{repo_id}@{pulled.commit_sha}")
            patch = reg.add_patch(out, name=name, base=base.ref, description=description)
        else:
            raise InvalidReferenceError(
                f"pull {at}: the repo holds neither a patchlab patch (patch.json) nor a PEFT adapter "
                f"(adapter_config.json); to use a model repo as a base: `patchlab base add FAMILY@VERSION {repo_id}`"
            )
    return PullOutcome(patch, repo_id, pulled.commit_sha, kind)


def _default_name(name: Any, repo_id: str) -> str:
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+\-]{0,199}", name):
        return name
    return re.sub(r"[^A-Za-z0-9._+\-]+", "-", repo_id.split("/")[-1]).strip("-._+")[:200] or "pulled"


def _hub_ids(meta: dict[str, Any]) -> list[str]:
    bm = meta.get("base_model")
    return [bm] if isinstance(bm, str) else [b for b in bm or [] if isinstance(b, str)]


def _add_base_hint(meta: dict[str, Any], info: dict[str, Any]) -> str:
    ids = _hub_ids(meta)
    label = info.get("base") if isinstance(info.get("base"), str) else None
    target = label if label and "@" in label else "FAMILY@VERSION"
    if ids:
        pinned = info.get("base_hub") if isinstance(info.get("base_hub"), str) else None
        rev = f" --revision {pinned.rpartition('@')[2]}" if pinned and pinned.startswith(ids[0] + "@") else ""
        return f"`patchlab base add {target} {ids[0]}{rev}`"
    return f"`patchlab base add {target} PATH` with that base's checkpoint directory"


def _fill_lazy_bases(reg: Registry, meta: dict[str, Any]) -> None:
    """Fingerprint the Hub bases recorded without one that the card names (downloads them)."""
    ids = set(_hub_ids(meta))
    for b in reg.list_bases():
        if b.content is None and b.source_kind == "hub" and b.source in ids:
            reg.checkpoint_path(b.ref)


def _base_by_fingerprint(
    reg: Registry, want: str | None, meta: dict[str, Any], info: dict[str, Any], at: str
) -> BaseInfo:
    if not want:
        raise InvalidReferenceError(
            f"pull {at}: neither the patch's manifest nor its card records a base fingerprint, so its base cannot "
            "be checked; download it (`hf download`) and register it by hand with `patchlab add DIR --base ...`"
        )
    for attempt in range(2):
        found = reg.find_base_by_content(want)  # a fingerprint of another algorithm is re-hashed to compare
        if found is not None:
            return found
        if attempt == 0:
            _fill_lazy_bases(reg, meta)
    label = f" ({info['base']})" if isinstance(info.get("base"), str) else ""
    raise UnknownReferenceError(
        f"pull {at}: the patch was made on a base that is not registered{label}, fingerprint {short_digest(want)}; "
        f"add it first with {_add_base_hint(meta, info)}, then pull again"
    )


def _base_of_adapter(reg: Registry, adapter: Path, meta: dict[str, Any], info: dict[str, Any], at: str) -> BaseInfo:
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        cfg = {}
    named = [*_hub_ids(meta), *([cfg["base_model_name_or_path"]] if cfg.get("base_model_name_or_path") else [])]
    if isinstance(info.get("base"), str):
        named.append(info["base"])
    want = info.get("base_fingerprint") if isinstance(info.get("base_fingerprint"), str) else None
    _fill_lazy_bases(reg, meta)
    bases = reg.list_bases()
    found = reg.find_base_by_content(want) if want else None
    found = found or next((b for n in named for b in bases if n in (b.ref, b.source)), None)
    if found is None:
        what = ", ".join(dict.fromkeys(str(n) for n in named)) or "no base named"
        raise UnknownReferenceError(
            f"pull {at}: the adapter's base ({what}) is not registered; add it first with "
            f"{_add_base_hint(meta, info)}, then pull again"
        )
    if want and reg.content_matches(found, want) is False:
        raise InvalidReferenceError(
            f"pull {at}: the adapter was made on a base with fingerprint {short_digest(want)}, but {found.ref} has "
            f"{short_digest(found.content)}; register the base it was made on, then pull again"
        )
    return found


def _note_origin(patch_dir: Path, origin: str) -> None:
    """Record where an imported adapter came from in its manifest (instead of the temporary download path)."""
    mf = patch_dir / MANIFEST
    manifest = json.loads(mf.read_text(encoding="utf-8"))
    ft = (manifest.get("provenance") or {}).get("finetuned")
    if isinstance(ft, dict):
        ft["peft_adapter"] = origin
        ft["repo_id"] = origin
        mf.write_text(json.dumps(manifest, indent=1), encoding="utf-8")


@contextmanager
def _scratch(reg: Registry, what: str) -> Iterator[Path]:
    """A temporary directory under the registry's cache, removed whatever happens."""
    root = reg.cache / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{what}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
