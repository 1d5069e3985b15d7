"""Portable patches: write diffs low-rank (truncated SVD) or sparse (top-k / DARE), tensor by tensor.

Two entry points share one encoder:

- ``compress(patch, out, rank=|energy=|density=|budget_bytes=)`` re-encodes an existing patch;
- ``extract_encoded(base, finetuned, out, ...)`` (``patchlab diff --rank/--energy/--density``) computes each
  ``Δ = ft − base`` in fp32 on the device and encodes it at once, never writing the dense diff.

Only one tensor's Δ is in memory at a time (plus the encoded tensors waiting for their shard to be
flushed). Per tensor the manifest records the encoding and its fidelity: ``rank``, ``energy`` (share of
‖Δ‖² kept) and ``rel_error`` (‖Δ − Δ̂‖/‖Δ‖, measured on the stored tensors) for low-rank; ``density``,
``nnz`` and ``rel_error`` for sparse. Tensors not worth factoring (1-D, a side < 16, or factors at least
as large as the dense delta) stay dense, as do embeddings unless ``embeddings="encode"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack

import torch

from patchlab.encodings import Encoded, codec, dense_entry
from patchlab.engine.devices import resolve_device
from patchlab.engine.executor import assemble, atomic_output, check_output
from patchlab.errors import PlanError
from patchlab.io.checkpoint import META_FILES, Checkpoint
from patchlab.io.patch import MAX_SHARD_BYTES, Patch, PatchWriter
from patchlab.kernels import lowrank as lr
from patchlab.kernels import sparse as sp
from patchlab.methods.extract import extract_job, resolve_storage_dtype
from patchlab.names import is_vocab_tensor

SPARSE_METHODS = ("topk", "dare")
EMBEDDING_CHOICES = ("dense", "encode")

__all__ = ["EncodingRequest", "compress", "extract_encoded", "encode_tensor", "patch_size_report"]


@dataclass(frozen=True)
class EncodingRequest:
    """What to encode and how. Exactly one of ``rank``, ``energy``, ``density``, ``budget_bytes`` is set."""

    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    budget_bytes: int | None = None
    method: str = "topk"  # sparse method: topk | dare
    seed: int = 0
    embeddings: str = "dense"  # dense | encode
    dense_fallback: bool = True  # keep a tensor dense when its encoding would not be smaller
    oversample: int = 10
    n_iter: int = 2
    max_rank: int | None = None  # cap for energy-based selection

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "energy", "density", "budget_bytes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PlanError(
                "choose exactly one of rank, energy, density or budget_bytes (--rank/--energy/--density/"
                f"--budget), got {', '.join(given) or 'none'}"
            )
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise lr.LowRankError(f"rank must be a positive integer, got {self.rank!r}")
        if self.energy is not None:
            lr.check_energy(self.energy)
        if self.density is not None:
            sp.check_density(self.density)
        if self.budget_bytes is not None and (not isinstance(self.budget_bytes, int) or self.budget_bytes <= 0):
            raise lr.LowRankError(f"size budget must be a positive number of bytes, got {self.budget_bytes!r}")
        if self.method not in SPARSE_METHODS:
            raise PlanError(f"unknown sparse method {self.method!r}; use one of {', '.join(SPARSE_METHODS)}")
        if self.embeddings not in EMBEDDING_CHOICES:
            raise PlanError(f"embeddings must be one of {', '.join(EMBEDDING_CHOICES)}, got {self.embeddings!r}")

    @property
    def kind(self) -> str:
        return "sparse" if self.density is not None else "lowrank"

    def to_json(self) -> dict:
        d: dict = {"encoding": self.kind}
        for k in ("rank", "energy", "density", "budget_bytes", "max_rank"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.kind == "sparse":
            d["method"] = self.method
            if self.method == "dare":
                d["seed"] = self.seed
        else:
            d.update(oversample=self.oversample, n_iter=self.n_iter, seed=self.seed)
        d["embeddings"] = self.embeddings
        return d


def encode_tensor(
    name: str, delta: torch.Tensor, enc: EncodingRequest, store: torch.dtype, *, rank: int | None = None
) -> Encoded:
    """Encode one fp32 Δ: (manifest fields to merge into its entry, tensors to store under their keys).

    ``rank`` overrides ``enc.rank`` (used by the size budget, which picks a rank per tensor).
    """
    if enc.embeddings == "dense" and is_vocab_tensor(name):
        return dense_entry(name, delta, store, "embedding kept dense (embeddings='dense')")
    return codec(enc.kind).encode(name, delta, enc, store, rank)


@dataclass
class _Item:
    """One manifest entry to write: its metadata and, for ``add`` entries, a way to get its fp32 Δ."""

    name: str
    meta: dict
    delta: Callable[[], torch.Tensor] | None = None  # add entries to encode
    tensors: Callable[[], dict[str, torch.Tensor]] | None = None  # entries copied as they are
    fix: tuple[torch.Tensor, torch.Tensor] | None = None  # exact-reconstruction residuals kept verbatim
    extra: dict = field(default_factory=dict)


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _budget_ranks(items: list[_Item], enc: EncodingRequest, store: torch.dtype) -> dict[str, int]:
    """Pass 1 of a size budget: spectra of every factorable Δ, then the global rank allocation."""
    itemsize = torch.tensor([], dtype=store).element_size()
    fixed = 0
    spectra: list[lr.Spectrum] = []
    mats: list[tuple[_Item, torch.Size]] = []
    for it in items:
        if it.delta is None:
            fixed += _tensor_bytes(it.tensors()) if it.tensors else 0
            continue
        shape = torch.Size(it.meta["shape"])
        if (enc.embeddings == "dense" and is_vocab_tensor(it.name)) or not lr.worth_factoring(shape, 1):
            fixed += math.prod(shape) * itemsize
            continue
        mats.append((it, shape))
    base_cost = sum(lr.factor_bytes(s, 1, itemsize) for _, s in mats)
    left = enc.budget_bytes - fixed - base_cost  # type: ignore[operator]
    if left < 0:
        raise lr.LowRankError(
            f"size budget {enc.budget_bytes} bytes is below the minimum {fixed + base_cost} bytes (tensors kept "
            f"dense: {fixed}, rank-1 factors of {len(mats)} matrices: {base_cost}); raise --budget or pass "
            "embeddings='encode'"
        )
    per_rank = sum((s[0] + s[1]) * itemsize for _, s in mats) or 1
    uniform = 1 + left // per_rank
    for it, shape in mats:
        k = max(1, min(lr.breakeven_rank(shape), min(shape), 4 * uniform + 8))
        d = it.delta()
        s = lr.spectrum(d, k, name=it.name, oversample=enc.oversample, n_iter=enc.n_iter, seed=enc.seed)
        del d
        spectra.append(lr.Spectrum(s.name, s.shape, s.sigma[1:], s.total))  # rank 1 is already paid for
    extra = lr.allocate_ranks(spectra, left, itemsize)
    return {it.name: 1 + extra[it.name] for it, _ in mats}


def _write(
    out: Path,
    items: list[_Item],
    enc: EncodingRequest,
    store: torch.dtype,
    provenance: dict,
    unused: list[dict],
    finetune: Callable[[PatchWriter], None],
    overwrite: bool,
    max_shard_bytes: int,
    progress: Callable[[str], None] | None,
) -> Patch:
    ranks = _budget_ranks(items, enc, store) if enc.budget_bytes is not None else {}
    entries: dict[str, dict] = {}
    with atomic_output(out, overwrite, "patch") as tmp:
        w = PatchWriter(tmp, max_shard_bytes)
        for it in items:
            meta = dict(it.meta)
            if it.delta is not None:
                d = it.delta()
                meta = dict(it.meta)  # after delta(): extract fills in the statistics while computing Δ
                fields, tensors = encode_tensor(it.name, d, enc, store, rank=ranks.get(it.name))
                del d
                meta.pop("fix", None)
                meta.update(fields)
                meta["file"] = w.add(tensors)
                if it.fix is not None and meta["encoding"] == "dense" and store == torch.float32:
                    meta["fix"] = w.add_fixups(it.name, *it.fix[:2], it.extra["fix"].get("base_digest"), it.fix[2])
            elif it.tensors is not None:
                meta["file"] = w.add(it.tensors())
            entries[it.name] = meta
            if progress:
                progress(it.name)
        finetune(w)
        w.finish(provenance, entries, unused)
    return Patch.open(out)


def _provenance(
    method: str, provenance: dict, enc: EncodingRequest, store: torch.dtype, extra: dict | None = None
) -> dict:
    prov = json.loads(json.dumps(provenance))
    params = dict(prov.get("parameters", {}))
    params.update({"compression": enc.to_json(), "storage_dtype": str(store).removeprefix("torch."), "exact": False})
    if extra:
        params.update(extra)
    prov["method"] = method
    prov["parameters"] = params
    return prov


class EncodingOptions(TypedDict, total=False):
    """The fields of ``Encoding`` as keyword arguments of ``compress`` and ``extract_encoded``."""

    rank: int | None
    energy: float | None
    density: float | None
    budget_bytes: int | None
    method: str  # topk | dare
    seed: int
    embeddings: str  # dense | encode
    dense_fallback: bool
    oversample: int
    n_iter: int


def compress(
    patch: str | Path | Patch,
    out: str | Path,
    *,
    storage_dtype: str | torch.dtype | None = None,
    device: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
    **encoding: Unpack[EncodingOptions],
) -> Patch:
    """Re-encode an existing patch low-rank (``rank``/``energy``/``budget_bytes``) or sparse (``density``).

    Each ``add`` tensor is densified alone (any input encoding), encoded on ``device`` and written; ``set`` and
    ``delete`` entries are copied. The storage dtype defaults to the source patch's. Errors in the request
    (rank larger than every matrix, energy or density outside (0, 1], a budget below the minimum) are raised
    before anything is written.
    """
    enc = EncodingRequest(**encoding)
    src = Patch.open(patch)
    out = Path(out)
    check_output(out, overwrite, "patch")
    dev = resolve_device(device)
    prev = src.provenance.get("parameters", {}).get("storage_dtype", "float32")
    # a patch stored in its fine-tune's dtype ("finetune") is re-encoded in fp32 unless asked otherwise: the
    # fp32 widening of its dense Δ is exact, so its residuals stay valid
    store = resolve_storage_dtype(storage_dtype, resolve_storage_dtype(prev, None) or torch.float32)
    items: list[_Item] = []
    for e in src.entries():
        meta = {k: v for k, v in e.meta.items() if k not in ("file", "keys", "encoding_note")}
        if e.op == "add":
            for k in ("encoding", "scale", "rank", "energy", "rel_error", "density", "method", "nnz", "seed"):
                meta.pop(k, None)
            fix = (*e.fixups(), e.fixup_base()) if e.fix and e.encoding == "dense" else None
            items.append(
                _Item(e.name, meta, delta=(lambda e=e: e.dense(dev)), fix=fix, extra={"fix": e.fix} if fix else {})
            )
        elif e.op == "set":
            meta["keys"] = dict(e.meta["keys"])
            items.append(_Item(e.name, meta, tensors=(lambda e=e: {e.meta["keys"]["value"]: e.stored("value")})))
        else:
            items.append(_Item(e.name, meta))
    _check_rank_fits(enc, [(it.name, tuple(it.meta["shape"])) for it in items if it.delta is not None])

    prov = _provenance("compress", src.provenance, enc, store, {"source_patch": str(src.path.resolve())})
    unused = src.manifest.get("unused", [])
    copy_ft = lambda w: w.copy_tree(src.finetune_dir)  # noqa: E731
    return _write(out, items, enc, store, prov, unused, copy_ft, overwrite, max_shard_bytes, progress)


def _check_rank_fits(enc: EncodingRequest, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
    """A fixed rank larger than every factorable matrix is a mistake, not a request for a dense patch."""
    if enc.rank is None:
        return
    mats = [
        (n, s) for n, s in shapes if lr.worth_factoring(s) and not (enc.embeddings == "dense" and is_vocab_tensor(n))
    ]
    if not mats:
        return
    biggest = max(min(s) for _, s in mats)
    too_big = [n for n, s in mats if enc.rank > min(s)]
    if enc.rank > biggest or (too_big and not enc.dense_fallback):
        n = too_big[0]
        s = dict(mats)[n]
        raise lr.LowRankError(
            f"rank {enc.rank} is larger than the matrices allow ({n} is {s[0]}×{s[1]}, at most {min(s)}; the "
            f"largest factorable matrix allows {biggest}); choose a smaller --rank"
        )


def extract_encoded(
    base: str | Path | Checkpoint,
    finetuned: str | Path | Checkpoint,
    out: str | Path,
    *,
    storage_dtype: str | torch.dtype | None = None,
    vocab_policy: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
    **encoding: Unpack[EncodingOptions],
) -> Patch:
    """``patchlab diff --rank R | --energy E | --density D | --budget B``: extract Δ = ft − base encoded.

    Follows the same extract plan as ``patchlab.extract`` (vocabulary policies, set/delete entries), but
    each tensor's Δ is computed whole in fp32 on ``device`` and encoded before the next is read; the dense
    diff is never written. Storage dtype defaults to fp32.
    """
    from patchlab.plan import plan_extract

    enc = EncodingRequest(**encoding)
    base_ck, ft_ck = Checkpoint.open(base), Checkpoint.open(finetuned)
    store = resolve_storage_dtype(storage_dtype)
    plan = plan_extract(base_ck, ft_ck, vocab_policy=vocab_policy, storage_dtype=store)
    out = Path(out)
    check_output(out, overwrite, "patch")
    dev = resolve_device(device)
    _check_rank_fits(enc, [(s.name, tuple(s.shape)) for s in plan.steps if s.action == "diff"])

    items: list[_Item] = []
    for s in plan.steps:
        if s.action == "delete":
            items.append(_Item(s.name, {"op": "delete", "shape": list(s.shape), "dtype": s.dtype}))
            continue
        entries: dict[str, dict] = {}
        job = extract_job(s, base_ck, ft_ck, plan, dev, entries)
        meta = entries[s.name]
        if s.action == "set":
            items.append(_Item(s.name, meta, tensors=(lambda job=job, n=s.name: {n: assemble(job, dev)})))
            continue

        def delta(job=job) -> torch.Tensor:  # the job's finish fills in the entry's statistics
            return assemble(job, dev, torch.float32)

        items.append(_Item(s.name, meta, delta=delta))

    prov = {
        "base": base_ck.describe(),
        "finetuned": ft_ck.describe(),
        "parameters": {"vocab_policy": vocab_policy},
    }
    prov = _provenance("extract", prov, enc, store)
    unused = [{"name": n, "reason": r, "parameters": p} for n, r, p in plan.unused]
    copy_ft = lambda w: w.copy_files(ft_ck.path, META_FILES)  # noqa: E731
    return _write(out, items, enc, store, prov, unused, copy_ft, overwrite, max_shard_bytes, progress)


def patch_size_report(patch: str | Path | Patch) -> dict:
    """Bytes, encodings and fidelity of a patch (per tensor and totals), from its manifest and files."""
    p = Patch.open(patch)
    rows = []
    for e in p.entries():
        if e.op != "add":
            continue
        m = e.meta
        rows.append(
            {
                "name": e.name,
                "encoding": e.encoding,
                "shape": list(e.shape),
                "rank": m.get("rank"),
                "density": m.get("density"),
                "energy": m.get("energy", 1.0 if e.encoding == "dense" else None),
                "rel_error": m.get("rel_error", 0.0 if e.encoding == "dense" else None),
                "bytes": sum(t.numel() * t.element_size() for t in map(e.stored, m["keys"])),
            }
        )
    return {
        "path": str(p.path),
        "tensors": rows,
        "bytes": sum(r["bytes"] for r in rows),
        "totals": p.manifest.get("totals", {}),
    }
