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
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack

import torch
from safetensors.torch import save_file

from patchlab.engine.executor import Job, _chunks, atomic_output, check_output, release_scratch, resolve_device
from patchlab.errors import NonFiniteDeltaError, PlanError
from patchlab.io.checkpoint import Checkpoint, is_vocab_tensor
from patchlab.io.patch import FINETUNE_DIR, FIXUPS_FILE, MANIFEST, Patch, manifest_header
from patchlab.kernels import lowrank as lr
from patchlab.kernels import sparse as sp
from patchlab.kernels.delta import DeltaStats, diff

DEFAULT_SHARD_BYTES = 512 << 20  # queued tensors are held in memory until their shard is written
CHUNK = 1 << 22  # elements per row chunk while computing one Δ
SPARSE_METHODS = ("topk", "dare")
EMBEDDING_CHOICES = ("dense", "encode")

__all__ = ["Encoding", "compress", "extract_encoded", "encode_tensor", "PatchWriter", "patch_size_report"]


@dataclass(frozen=True)
class Encoding:
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
            lr._check_energy(self.energy)
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


def _dense(name: str, delta: torch.Tensor, store: torch.dtype, note: str = "") -> tuple[dict, dict]:
    meta: dict = {"encoding": "dense", "keys": {"delta": name}}
    if note:
        meta["encoding_note"] = note
    return meta, {name: delta.to(store).contiguous().cpu()}


def encode_tensor(
    name: str, delta: torch.Tensor, enc: Encoding, store: torch.dtype, *, rank: int | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Encode one fp32 Δ: (manifest fields to merge into its entry, tensors to store under their keys).

    ``rank`` overrides ``enc.rank`` (used by the size budget, which picks a rank per tensor).
    """
    if enc.embeddings == "dense" and is_vocab_tensor(name):
        return _dense(name, delta, store, "embedding kept dense (embeddings='dense')")
    itemsize = torch.tensor([], dtype=store).element_size()
    if enc.kind == "sparse":
        if delta.ndim == 0:
            return _dense(name, delta, store, "scalar")
        if enc.method == "topk":
            idx, vals = sp.topk(delta, enc.density)  # type: ignore[arg-type]
        else:
            idx, vals = sp.dare(delta, enc.density, seed=enc.seed, name=name)  # type: ignore[arg-type]
        vals = vals.to(store)
        flat = delta.reshape(-1)
        tot = float(torch.linalg.vector_norm(flat, dtype=torch.float64) ** 2)
        kept = flat[idx]
        kept2 = float(torch.linalg.vector_norm(kept, dtype=torch.float64) ** 2)
        err2 = tot - kept2
        err2 += float(torch.linalg.vector_norm(kept - vals.float(), dtype=torch.float64) ** 2)
        meta = {
            "encoding": "sparse",
            "keys": {"indices": f"{name}::indices", "values": f"{name}::values"},
            "density": enc.density,
            "method": enc.method,
            "nnz": int(idx.numel()),
            "rel_error": math.sqrt(max(err2, 0.0) / tot) if tot > 0 else 0.0,
        }
        if enc.method == "dare":
            meta["seed"] = enc.seed
        else:
            meta["energy"] = min(kept2 / tot, 1.0) if tot > 0 else 1.0
        return meta, {f"{name}::indices": idx.cpu().contiguous(), f"{name}::values": vals.cpu().contiguous()}
    # low-rank
    if not lr.worth_factoring(delta.shape):
        why = "1-D" if delta.ndim < 2 else ("not 2-D" if delta.ndim > 2 else f"a side < {lr.MIN_FACTOR_DIM}")
        return _dense(name, delta, store, f"not factored ({why})")
    p = min(delta.shape)
    r = rank if rank is not None else enc.rank
    if r is not None and r > p:
        if enc.dense_fallback:
            return _dense(name, delta, store, f"rank {r} exceeds the matrix ({p}); kept dense")
        raise lr.LowRankError(
            f"rank {r} is larger than {name} ({delta.shape[0]}×{delta.shape[1]}) allows (at most {p}); "
            f"choose a rank ≤ {p}"
        )
    if r is not None and enc.dense_fallback and not lr.worth_factoring(delta.shape, r):
        return _dense(name, delta, store, f"rank-{r} factors would not be smaller than the dense delta")
    f = lr.factorize(
        delta,
        rank=r,
        energy=enc.energy if r is None else None,
        max_rank=enc.max_rank,
        oversample=enc.oversample,
        n_iter=enc.n_iter,
        seed=enc.seed,
        dtype=store,
    )
    if enc.dense_fallback and lr.factor_bytes(delta.shape, f.rank, itemsize) >= delta.numel() * itemsize:
        return _dense(name, delta, store, f"rank-{f.rank} factors would not be smaller than the dense delta")
    meta = {
        "encoding": "lowrank",
        "keys": {"A": f"{name}::A", "B": f"{name}::B"},
        "scale": f.scale,
        "rank": f.rank,
        "energy": f.energy,
        "rel_error": f.rel_error,
    }
    return meta, {f"{name}::A": f.A.cpu().contiguous(), f"{name}::B": f.B.cpu().contiguous()}


class PatchWriter:
    """Collects tensors into ``delta-NNNNN.safetensors`` shards of at most ``max_bytes`` inside ``root``."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "delta"):
        self.root, self.max_bytes, self.prefix = root, max_bytes, prefix
        self._buf: dict[str, torch.Tensor] = {}
        self._size = 0
        self._n = 0
        self.bytes_written = 0

    @property
    def current(self) -> str:
        return f"{self.prefix}-{self._n + 1:05d}.safetensors"

    def add(self, tensors: dict[str, torch.Tensor]) -> str:
        """Queue tensors (all in one shard) and return that shard's file name."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._buf and self._size + size > self.max_bytes:
            self.flush()
        self._buf.update(tensors)
        self._size += size
        return self.current

    def flush(self) -> None:
        if self._buf:
            save_file(self._buf, str(self.root / self.current), metadata={"format": "pt"})
            self.bytes_written += self._size
            self._buf, self._size = {}, 0
            self._n += 1


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _assemble(job: Job, dev: torch.device, stats: DeltaStats | None = None) -> torch.Tensor:
    """One tensor's fp32 Δ, from row chunks as the engine loads them (vocabulary row maps included)."""
    out = torch.empty(job.shape, dtype=torch.float32, device=dev)
    try:
        for r0, r1 in _chunks(job, CHUNK):
            f, b = job.load(r0, r1)  # into engine scratch: consumed before the next load
            d = diff(f, b)
            if stats is not None:
                stats.update(d, b, offset=r0 * job.row_elems)
                if stats.nonfinite:
                    break
            if not job.shape:
                return d.reshape(())
            out[r0:r1] = d.reshape((r1 - r0, *job.shape[1:]))
        return out
    finally:
        release_scratch()


@dataclass
class _Item:
    """One manifest entry to write: its metadata and, for ``add`` entries, a way to get its fp32 Δ."""

    name: str
    meta: dict
    delta: Callable[[], torch.Tensor] | None = None  # add entries to encode
    peek: Callable[[], torch.Tensor] | None = None  # the same Δ without side effects (budget pass)
    tensors: Callable[[], dict[str, torch.Tensor]] | None = None  # entries copied as they are
    fix: tuple[torch.Tensor, torch.Tensor] | None = None  # exact-reconstruction residuals kept verbatim
    extra: dict = field(default_factory=dict)


def _budget_ranks(items: list[_Item], enc: Encoding, store: torch.dtype) -> dict[str, int]:
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
        d = (it.peek or it.delta)()
        s = lr.spectrum(d, k, name=it.name, oversample=enc.oversample, n_iter=enc.n_iter, seed=enc.seed)
        del d
        spectra.append(lr.Spectrum(s.name, s.shape, s.sigma[1:], s.total))  # rank 1 is already paid for
    extra = lr.allocate_ranks(spectra, left, itemsize)
    return {it.name: 1 + extra[it.name] for it, _ in mats}


def _write(
    out: Path,
    items: list[_Item],
    enc: Encoding,
    store: torch.dtype,
    manifest_head: dict,
    finetune_src: Callable[[Path], None],
    overwrite: bool,
    max_shard_bytes: int,
    progress: Callable[[str], None] | None,
) -> Patch:
    ranks = _budget_ranks(items, enc, store) if enc.budget_bytes is not None else {}
    entries: dict[str, dict] = {}
    fixups: dict[str, torch.Tensor] = {}
    with atomic_output(out, overwrite) as tmp:
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
                    idx, vals = it.fix
                    meta["fix"] = dict(it.extra["fix"])
                    fixups[meta["fix"]["indices"]] = idx
                    fixups[meta["fix"]["values"]] = vals
            elif it.tensors is not None:
                meta["file"] = w.add(it.tensors())
            entries[it.name] = meta
            if progress:
                progress(it.name)
        w.flush()
        if fixups:
            save_file(fixups, str(tmp / FIXUPS_FILE))
        (tmp / FINETUNE_DIR).mkdir()
        finetune_src(tmp / FINETUNE_DIR)
        manifest = dict(manifest_head)
        manifest["totals"] = _totals(entries, tmp)
        manifest["tensors"] = entries
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Patch.open(out)


def _totals(entries: dict[str, dict], root: Path) -> dict:
    adds = [e for e in entries.values() if e["op"] == "add"]
    n = sum(math.prod(e["shape"]) for e in adds)
    sumsq = sum(e.get("stats", {}).get("norm", 0.0) ** 2 for e in adds)
    by_enc: dict[str, int] = {}
    for e in adds:
        by_enc[e.get("encoding", "dense")] = by_enc.get(e.get("encoding", "dense"), 0) + 1
    # Energy kept over the whole patch: Σ kept / Σ ‖Δ‖², with dense tensors counted as fully kept.
    # DARE entries have no energy share (their survivors are rescaled: not a projection of Δ); a patch with
    # any of them reports energy None and only the pooled relative error.
    kept: float | None = 0.0
    err2 = 0.0
    for e in adds:
        norm2 = e.get("stats", {}).get("norm", 0.0) ** 2
        if e.get("method") == "dare":
            kept = None
        elif kept is not None:
            kept += norm2 * e.get("energy", 1.0)  # dense: all of it
        err2 += norm2 * e.get("rel_error", 0.0) ** 2
    return {
        "tensors": len(entries),
        "delta_tensors": len(adds),
        "delta_parameters": n,
        "norm": sumsq**0.5,
        "encodings": by_enc,
        "energy": None if kept is None else (kept / sumsq if sumsq > 0 else 1.0),
        "rel_error": math.sqrt(err2 / sumsq) if sumsq > 0 else 0.0,
        "bytes": sum(p.stat().st_size for p in root.glob("*.safetensors")),
        "fixups": 0,
    }


def _head(method: str, provenance: dict, enc: Encoding, store: torch.dtype, extra: dict | None = None) -> dict:
    prov = json.loads(json.dumps(provenance))
    params = dict(prov.get("parameters", {}))
    params.update({"compression": enc.to_json(), "storage_dtype": str(store).removeprefix("torch."), "exact": False})
    if extra:
        params.update(extra)
    prov["method"] = method
    prov["parameters"] = params
    return manifest_header(prov)


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


def _store_dtype(storage_dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    from patchlab.methods.port import _dtype

    return _dtype(storage_dtype) or default


def compress(
    patch: str | Path | Patch,
    out: str | Path,
    *,
    storage_dtype: str | torch.dtype | None = None,
    device: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
    **encoding: Unpack[EncodingOptions],
) -> Patch:
    """Re-encode an existing patch low-rank (``rank``/``energy``/``budget_bytes``) or sparse (``density``).

    Each ``add`` tensor is densified alone (any input encoding), encoded on ``device`` and written; ``set`` and
    ``delete`` entries are copied. The storage dtype defaults to the source patch's. Errors in the request
    (rank larger than every matrix, energy or density outside (0, 1], a budget below the minimum) are raised
    before anything is written.
    """
    enc = Encoding(**encoding)
    src = Patch.open(patch)
    out = Path(out)
    check_output(out, overwrite)
    dev = resolve_device(device)
    prev = src.provenance.get("parameters", {}).get("storage_dtype", "float32")
    store = _store_dtype(storage_dtype, _store_dtype(prev, torch.float32))
    items: list[_Item] = []
    for e in src.entries():
        meta = {k: v for k, v in e.meta.items() if k not in ("file", "keys", "encoding_note")}
        if e.op == "add":
            for k in ("encoding", "scale", "rank", "energy", "rel_error", "density", "method", "nnz", "seed"):
                meta.pop(k, None)
            fix = e.fixups() if e.fix and e.encoding == "dense" else None
            items.append(
                _Item(e.name, meta, delta=(lambda e=e: e.dense(dev)), fix=fix, extra={"fix": e.fix} if fix else {})
            )
        elif e.op == "set":
            meta["keys"] = dict(e.meta["keys"])
            items.append(_Item(e.name, meta, tensors=(lambda e=e: {e.meta["keys"]["value"]: e._t("value")})))
        else:
            items.append(_Item(e.name, meta))
    _check_rank_fits(enc, [(it.name, tuple(it.meta["shape"])) for it in items if it.delta is not None])

    def copy_ft(dst: Path) -> None:
        if src.finetune_dir.exists():
            shutil.copytree(src.finetune_dir, dst, dirs_exist_ok=True)

    head = _head("compress", src.provenance, enc, store, {"source_patch": str(src.path.resolve())})
    head["unused"] = src.manifest.get("unused", [])
    return _write(out, items, enc, store, head, copy_ft, overwrite, max_shard_bytes, progress)


def _check_rank_fits(enc: Encoding, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
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
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
    **encoding: Unpack[EncodingOptions],
) -> Patch:
    """``patchlab diff --rank R | --energy E | --density D | --budget B``: extract Δ = ft − base encoded.

    Follows the same extract plan as ``patchlab.extract`` (vocabulary policies, set/delete entries), but
    each tensor's Δ is computed whole in fp32 on ``device`` and encoded before the next is read; the dense
    diff is never written. Storage dtype defaults to fp32.
    """
    from patchlab.methods.port import _describe, _extract_job
    from patchlab.plan import plan_extract

    enc = Encoding(**encoding)
    base_ck, ft_ck = Checkpoint.open(base), Checkpoint.open(finetuned)
    store = _store_dtype(storage_dtype, torch.float32)
    plan = plan_extract(base_ck, ft_ck, vocab_policy=vocab_policy, storage_dtype=store)
    out = Path(out)
    check_output(out, overwrite)
    dev = resolve_device(device)
    _check_rank_fits(enc, [(s.name, tuple(s.shape)) for s in plan.steps if s.action == "diff"])

    items: list[_Item] = []
    for s in plan.steps:
        if s.action == "delete":
            items.append(_Item(s.name, {"op": "delete", "shape": list(s.shape), "dtype": s.dtype}))
            continue
        entries: dict[str, dict] = {}
        job = _extract_job(s, base_ck, ft_ck, plan, dev, False, entries, {})
        meta = entries[s.name]
        if s.action == "set":
            items.append(_Item(s.name, meta, tensors=(lambda job=job, n=s.name: {n: job.load(0, job.rows)[0]})))
            continue

        def delta(job=job, meta=meta, name=s.name) -> torch.Tensor:
            st = DeltaStats()
            out = _assemble(job, dev, st)
            if st.nonfinite:
                raise NonFiniteDeltaError(
                    f"Δ of {name} has NaN/Inf (first at flat element {st.first_nonfinite}); the base or the "
                    "fine-tune holds non-finite weights"
                )
            meta["stats"] = st.result()
            return out

        def peek(job=job) -> torch.Tensor:
            return _assemble(job, dev)

        items.append(_Item(s.name, meta, delta=delta, peek=peek))

    def copy_ft(dst: Path) -> None:
        from patchlab.methods.port import META_FILES, _copy_meta

        _copy_meta(ft_ck.path, dst, META_FILES)

    prov = {
        "base": _describe(base_ck),
        "finetuned": _describe(ft_ck),
        "parameters": {"vocab_policy": vocab_policy},
    }
    head = _head("extract", prov, enc, store)
    head["unused"] = [{"name": n, "reason": r, "parameters": p} for n, r, p in plan.unused]
    return _write(out, items, enc, store, head, copy_ft, overwrite, max_shard_bytes, progress)


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
                "bytes": sum(_stored_bytes(p, m["file"], k) for k in m["keys"].values()),
            }
        )
    return {
        "path": str(p.path),
        "tensors": rows,
        "bytes": sum(r["bytes"] for r in rows),
        "totals": p.manifest.get("totals", {}),
    }


def _stored_bytes(p: Patch, fname: str, key: str) -> int:
    t = p._tensor(fname, key)
    return t.numel() * t.element_size()
