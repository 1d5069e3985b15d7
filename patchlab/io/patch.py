"""patchlab's on-disk patch format: a versioned manifest plus safetensors shards.

A patch directory::

    patch.json                      manifest: format version, provenance, one entry per tensor
    delta-00001-of-00002.safetensors
    fixups.safetensors              (optional) exact-reconstruction residuals, see below; past FIXUP_BUFFER_BYTES
                                    of them, fixups-00001-of-0000N.safetensors (each entry's ``fix.file``)
    finetune/                       config, generation config and tokenizer files of the fine-tune

Each tensor entry has an ``op``: ``add`` (a delta, in one of several *encodings*), ``set`` (a value that
replaces the base's: integer buffers, tensors only the fine-tune has) or ``delete`` (a tensor only the base
has). Encodings of an ``add``: ``dense`` (ΔW), ``lowrank`` (ΔW = scale·B·A) and ``sparse`` (flat indices +
values). Any encoding yields dense rows of ΔW on demand (``PatchTensor.rows``), so no consumer ever
densifies a whole patch.

Exactness: ``cast(base + Δ)`` reproduces the fine-tune for all but a few elements (Δ rounded to its storage
dtype, signed zeros, wide exponent gaps). Extract records those elements as ``fix`` residuals: their flat
positions, the fine-tune's values and the base's values there. ``apply``/``port`` with α = 1 write a
residual back wherever the target holds exactly the base's value at that position (so onto the patch's own
base the round trip is exact, and onto another base the elements it shares with the patch's base come out
as the fused port gives them). Residuals written before the base values were recorded carry a digest of the
whole base tensor instead, and are applied only onto a tensor with that digest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import save_file

from patchlab.errors import PatchFormatError
from patchlab.io.safetensors import MappedFile

FORMAT = "patchlab.io.patch"
FORMAT_VERSION = 1
MANIFEST = "patch.json"
FINETUNE_DIR = "finetune"
FIXUPS_FILE = "fixups.safetensors"
FIXUP_BUFFER_BYTES = 16 << 20  # residuals held in memory before they are written out as a fixup shard
OPS = ("add", "set", "delete")
SHARD_PREFIX = "delta"
MAX_SHARD_BYTES = 4 << 30  # a shard file is at most this large (as the Hugging Face hub's own default)
BUFFER_BYTES = 512 << 20  # tensors handed to PatchWriter.add are held in memory up to this much


def manifest_header(provenance: dict) -> dict:
    """The fields every patch manifest starts with; callers add ``totals``, ``tensors`` and the rest."""
    from patchlab import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "patchlab_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "provenance": provenance,
    }


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (used to recognise the exact base tensor a patch was made on)."""
    t = t.contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy())).hexdigest()


@dataclass(frozen=True)
class PatchTensor:
    """One tensor entry of a patch; reads its data lazily from the patch's shards."""

    name: str
    meta: dict
    _patch: Patch

    @property
    def op(self) -> str:
        return self.meta["op"]

    @property
    def encoding(self) -> str:
        return self.meta.get("encoding", "dense")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["dtype"])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stats(self) -> dict:
        return self.meta.get("stats", {})

    @property
    def drift_sums(self) -> dict[str, float] | None:
        """Sums recorded at extraction against the patch's own base (``methods.extract.drift_sums``), if any."""
        return self.meta.get("drift_sums")

    @property
    def nrows(self) -> int:
        return self.shape[0] if self.shape else 1

    def stored(self, role: str) -> torch.Tensor:
        """The stored tensor playing ``role`` (``delta``, ``A``, ``B``, ``indices``, ``value``...), zero-copy."""
        return self._patch._tensor(self.meta["file"], self.meta["keys"][role])

    def stored_dtype(self, role: str) -> torch.dtype:
        """The dtype ``role`` is stored in (a Δ may be stored narrower or wider than its checkpoint dtype)."""
        return self._patch._file(self.meta["file"]).entries[self.meta["keys"][role]].dtype

    def stored_rows(self, role: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[r0, r1)`` of a stored tensor, read into ``out`` when it has the right shape and dtype."""
        f, key = self._patch._file(self.meta["file"]), self.meta["keys"][role]
        want = (min(r1, self.shape[0]) - r0, *self.shape[1:])
        fits = out is not None and tuple(out.shape) == want and out.dtype == f.entries[key].dtype
        return f.rows(key, r0, r1, out if fits else None)

    def rows(
        self, r0: int, r1: int, device: torch.device | str = "cpu", out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense fp32 rows ``[r0, r1)`` of ΔW (or of the value, for ``set``).

        Rows of ``add`` entries are the caller's own to modify: read (into ``out`` when it is given and
        matches the stored rows' shape and dtype) or computed afresh, never a view of the file.
        """
        if self.op == "set":
            v = self.stored("value")
            return (v if not self.shape else v[r0:r1]).to(device).float()
        if self.op != "add":
            raise PatchFormatError(f"tensor {self.name!r} is deleted by the patch; it has no rows")
        from patchlab.encodings import codec

        return codec(self.encoding, str(self._patch.path)).rows(self, r0, r1, device, out)

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.rows(0, self.nrows, device)

    @property
    def fix(self) -> dict | None:
        return self.meta.get("fix")

    def fixups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices, exact values in the checkpoint dtype) of the residuals, if any."""
        f = self.meta["fix"]
        file = f.get("file", FIXUPS_FILE)
        return self._patch._tensor(file, f["indices"]), self._patch._tensor(file, f["values"])

    def fixup_base(self) -> torch.Tensor | None:
        """The base's values at the residuals' positions (None for patches that recorded a digest instead)."""
        f = self.meta.get("fix") or {}
        return self._patch._tensor(f.get("file", FIXUPS_FILE), f["base"]) if f.get("base") else None


class Patch:
    """An opened patch directory. ``Patch.open(path)`` validates the manifest and every shard header."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._files: dict[str, MappedFile] = {}

    @classmethod
    def open(cls, path: str | Path | Patch) -> Patch:
        if isinstance(path, Patch):
            return path
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.exists():
            what = "does not exist" if not path.exists() else f"has no {MANIFEST}"
            raise PatchFormatError(f"{path} {what}; pass a directory written by `patchlab diff`")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise PatchFormatError(f"{mpath}: invalid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise PatchFormatError(f"{mpath}: not a patchlab patch (format={manifest.get('format')!r})")
        v = manifest.get("format_version")
        if not isinstance(v, int) or v > FORMAT_VERSION:
            raise PatchFormatError(
                f"{mpath}: format version {v} is newer than this patchlab understands ({FORMAT_VERSION}); upgrade"
            )
        p = cls(path, manifest)
        from patchlab.encodings import names as encodings

        known = encodings()
        for name, meta in manifest.get("tensors", {}).items():
            if meta.get("op") not in OPS or meta.get("encoding", "dense") not in known:
                raise PatchFormatError(f"{mpath}: tensor {name!r} has op/encoding this patchlab does not know")
            for role, key in meta.get("keys", {}).items():
                f = p._file(meta["file"])
                if key not in f.entries:
                    raise PatchFormatError(
                        f"{path / meta['file']} lacks {key!r} ({role} of {name!r}); the patch is damaged"
                    )
            _check_stored(path, name, meta, p)
        return p

    def _file(self, fname: str) -> MappedFile:
        f = self._files.get(fname)
        if f is None:
            fp = self.path / fname
            if not fp.exists():
                raise PatchFormatError(f"{self.path}: shard {fname} is missing; the patch is incomplete")
            from patchlab.errors import CorruptCheckpointError

            try:
                f = self._files[fname] = MappedFile(fp)
            except CorruptCheckpointError as e:
                raise PatchFormatError(str(e)) from None
        return f

    def _tensor(self, fname: str, key: str) -> torch.Tensor:
        return self._file(fname).tensor(key)

    @property
    def names(self) -> list[str]:
        return list(self.manifest["tensors"])

    def __contains__(self, name: str) -> bool:
        return name in self.manifest["tensors"]

    def entry(self, name: str) -> PatchTensor:
        return PatchTensor(name, self.manifest["tensors"][name], self)

    def entries(self) -> list[PatchTensor]:
        return [self.entry(n) for n in self.names]

    @property
    def provenance(self) -> dict:
        return self.manifest.get("provenance", {})

    @property
    def finetune_dir(self) -> Path:
        return self.path / FINETUNE_DIR

    @cached_property
    def source_vocab(self) -> dict[str, int] | None:
        from patchlab.io.checkpoint import load_vocab

        return load_vocab(self.finetune_dir) if self.finetune_dir.exists() else None

    @property
    def source_tied(self) -> bool:
        return bool(self.provenance.get("finetuned", {}).get("tied", False))

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(m["shape"]) for m in self.manifest["tensors"].values() if m["op"] != "delete")

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __repr__(self) -> str:
        return f"Patch({str(self.path)!r}, tensors={len(self.manifest['tensors'])})"


# ---- writing ----------------------------------------------------------------------------------------------
def shard_file(i: int, n: int) -> str:
    """Name of shard ``i`` (0-based) of ``n``: ``delta-00001-of-00002.safetensors``."""
    return f"{SHARD_PREFIX}-{i + 1:05d}-of-{n:05d}.safetensors"


def group_shards(sizes: Sequence[tuple[str, int]], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Names grouped in order into shards of at most ``max_bytes`` (a tensor larger than that is alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, n in sizes:
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups if groups[0] else []


def totals(entries: Mapping[str, dict], fixups: int, nbytes: int) -> dict:
    """Patch-wide figures for the manifest, from the tensor entries alone (every writer uses this)."""
    adds = [e for e in entries.values() if e["op"] == "add"]
    n = sum(math.prod(e["shape"]) for e in adds)
    norms2 = [e.get("stats", {}).get("norm", 0.0) ** 2 for e in adds]
    sumsq = sum(norms2)
    by_enc: dict[str, int] = {}
    for e in adds:
        by_enc[e.get("encoding", "dense")] = by_enc.get(e.get("encoding", "dense"), 0) + 1
    # Energy kept over the whole patch: Σ kept / Σ ‖Δ‖², dense tensors counted as fully kept. DARE entries
    # have no energy share (their survivors are rescaled: not a projection of Δ), so a patch with any of them
    # reports energy None and only the pooled relative error.
    kept: float | None = 0.0
    err2 = 0.0
    for e, norm2 in zip(adds, norms2, strict=True):
        if e.get("method") == "dare":
            kept = None
        elif kept is not None:
            kept += norm2 * e.get("energy", 1.0)
        err2 += norm2 * e.get("rel_error", 0.0) ** 2
    out = {
        "tensors": len(entries),
        "delta_tensors": len(adds),
        "delta_parameters": n,
        "norm": sumsq**0.5,
        "encodings": by_enc,
        "energy": None if kept is None else (kept / sumsq if sumsq > 0 else 1.0),
        "rel_error": math.sqrt(err2 / sumsq) if sumsq > 0 else 0.0,
        "bytes": nbytes,
        "fixups": fixups,
    }
    if all("changed_frac" in e.get("stats", {}) for e in adds):
        changed = sum(e["stats"]["changed_frac"] * math.prod(e["shape"]) for e in adds)
        out["changed_frac"] = changed / n if n else 0.0
    return out


class PatchWriter:
    """THE writer of the patch format, inside a directory that ``atomic_output`` will publish.

    Tensors reach the shards in one of two ways: ``add`` (encoded tensors, held in memory up to
    ``BUFFER_BYTES`` and then written as a shard), or ``plan_shards`` (names and sizes known in advance; the
    engine streams the shards itself). ``finish`` names the shards ``delta-NNNNN-of-NNNNN``, writes the fixups,
    and writes the manifest with its ``totals``.
    """

    def __init__(self, root: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.root = Path(root)
        self.max_bytes = min(max_shard_bytes, BUFFER_BYTES)
        self._buf: dict[str, torch.Tensor] = {}
        self._size = 0
        self._written: list[str] = []  # provisional names of buffered shards, renamed by finish
        self._planned: list[str] = []
        self._fixups: dict[str, torch.Tensor] = {}  # residuals not yet written
        self._fix_bytes = 0
        self._fix_files: list[str] = []  # provisional names of written fixup shards
        self._fix_entries: list[dict] = []  # every "fix" field handed out (finish sets their file)
        self._fix_count = 0
        self._fix_lock = threading.Lock()  # engine workers finish tensors concurrently
        self._plan_bytes = max_shard_bytes

    def plan_shards(self, sizes: Sequence[tuple[str, int]]) -> list[tuple[str, list[str]]]:
        """Final shard names for tensors the engine writes itself: ``[(file, [tensor names])]``."""
        groups = group_shards(sizes, self._plan_bytes)
        planned = [(shard_file(i, len(groups)), g) for i, g in enumerate(groups)]
        self._planned = [f for f, _ in planned]
        return planned

    def add(self, tensors: Mapping[str, torch.Tensor]) -> str:
        """Queue tensors (all in one shard); returns the provisional shard name (``finish`` renames it)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._buf and self._size + size > self.max_bytes:
            self._flush()
        self._buf.update({k: t.detach().cpu().contiguous() for k, t in tensors.items()})
        self._size += size
        return self._current

    @property
    def _current(self) -> str:
        return f".{SHARD_PREFIX}-{len(self._written) + 1:05d}.safetensors"

    def _flush(self) -> None:
        if self._buf:
            save_file(self._buf, str(self.root / self._current), metadata={"format": "pt"})
            self._written.append(self._current)
            self._buf, self._size = {}, 0

    def add_fixups(
        self,
        name: str,
        indices: torch.Tensor,
        values: torch.Tensor,
        base_digest: str | None = None,
        base_values: torch.Tensor | None = None,
    ) -> dict:
        """Store exact-reconstruction residuals of ``name`` (sorted flat indices, the fine-tune's values, and
        the base's values there or a digest of the whole base tensor); returns the entry's ``fix`` field."""
        if indices.dtype != torch.int32 and indices.numel() and int(indices.max()) < 2**31:
            indices = indices.to(torch.int32)  # 4 bytes an index instead of 8: fixups are ~3% of a native Δ
        tensors = {f"{name}::indices": indices, f"{name}::values": values}
        fix = {"indices": f"{name}::indices", "values": f"{name}::values", "count": int(indices.numel())}
        if base_values is not None:
            tensors[f"{name}::base"] = base_values
            fix["base"] = f"{name}::base"
        fix["base_digest"] = base_digest
        with self._fix_lock:
            for k, t in tensors.items():
                self._fixups[k] = t.cpu().contiguous()
                self._fix_bytes += t.numel() * t.element_size()
            self._fix_count += int(indices.numel())
            fix["file"] = f".fixups-{len(self._fix_files) + 1:05d}.safetensors"  # provisional: see finish
            self._fix_entries.append(fix)
            if self._fix_bytes >= FIXUP_BUFFER_BYTES:  # bounded memory: a 1B bf16 patch has ~0.3 GB of them
                self._flush_fixups()
        return fix

    def _flush_fixups(self) -> None:
        if self._fixups:
            name = f".fixups-{len(self._fix_files) + 1:05d}.safetensors"
            save_file(self._fixups, str(self.root / name))
            self._fix_files.append(name)
            self._fixups, self._fix_bytes = {}, 0

    def copy_files(self, src: Path, names: Iterable[str], into: str = FINETUNE_DIR) -> None:
        """Copy those of ``names`` that exist in ``src`` into ``into/`` (the fine-tune's config and tokenizer)."""
        dst = self.root / into
        dst.mkdir(exist_ok=True)
        for n in names:
            if (src / n).is_file():
                shutil.copy2(src / n, dst / n)

    def copy_tree(self, src: Path, into: str = FINETUNE_DIR) -> None:
        (self.root / into).mkdir(exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, self.root / into, dirs_exist_ok=True)

    def finish(self, provenance: dict, entries: dict[str, dict], unused: Sequence[dict] = ()) -> dict:
        """Name the shards, write fixups and the manifest; returns the manifest."""
        self._flush()
        (self.root / FINETUNE_DIR).mkdir(exist_ok=True)
        if self._written:
            final = {old: shard_file(i, len(self._written)) for i, old in enumerate(self._written)}
            for old, new in final.items():
                (self.root / old).rename(self.root / new)
            for e in entries.values():
                if e.get("file") in final:
                    e["file"] = final[e["file"]]
        self._flush_fixups()
        # one fixup file keeps the historical name (and entries without a "file"); more are numbered
        n = len(self._fix_files)
        final_fix = {
            old: FIXUPS_FILE if n == 1 else f"fixups-{i + 1:05d}-of-{n:05d}.safetensors"
            for i, old in enumerate(self._fix_files)
        }
        for old, new in final_fix.items():
            (self.root / old).rename(self.root / new)
        for fix in self._fix_entries:
            if n == 1:
                fix.pop("file", None)
            else:
                fix["file"] = final_fix[fix["file"]]
        nbytes = sum(p.stat().st_size for p in self.root.glob(f"{SHARD_PREFIX}-*.safetensors"))
        fix_count = self._fix_count
        manifest = {
            **manifest_header(provenance),
            "totals": totals(entries, fix_count, nbytes),
            "unused": list(unused),
            "tensors": entries,
        }
        (self.root / MANIFEST).write_text(json.dumps(manifest, indent=1, default=list))
        return manifest


def _check_stored(path: Path, name: str, meta: dict, p: Patch) -> None:
    """The shard's tensors of one entry have the shapes and dtypes its manifest entry implies."""
    keys = meta.get("keys") or {}
    if not keys:
        return
    f = p._file(meta["file"])
    where = path / meta["file"]
    shape = tuple(int(x) for x in meta.get("shape") or ())
    dt = meta.get("dtype")
    if dt is not None and not isinstance(getattr(torch, str(dt), None), torch.dtype):
        raise PatchFormatError(f"{path / MANIFEST}: tensor {name!r} has unknown dtype {dt!r}; the patch is damaged")

    def bad(role: str, want: str) -> PatchFormatError:
        e = f.entries[keys[role]]
        return PatchFormatError(
            f"{where}: {keys[role]!r} ({role} of {name!r}) is {list(e.shape)} {str(e.dtype).removeprefix('torch.')}"
            f" but the manifest needs {want}; the patch is damaged: re-extract it (`patchlab diff`)"
        )

    for role, key in keys.items():
        e = f.entries[key]
        if role == "indices":
            if e.dtype.is_floating_point or e.dtype.is_complex or len(e.shape) != 1:
                raise bad(role, "a 1-D integer tensor")
        elif role in ("delta", "A", "B", "values") and not e.dtype.is_floating_point:
            raise bad(role, "a floating-point tensor")  # a stored 'set' value keeps its own dtype
    enc = meta.get("encoding", "dense")
    if enc == "dense" and "delta" in keys and tuple(f.entries[keys["delta"]].shape) != shape:
        raise bad("delta", f"shape {list(shape)}")
    if enc == "lowrank" and {"A", "B"} <= set(keys) and len(shape) >= 2:
        a, b = f.entries[keys["A"]].shape, f.entries[keys["B"]].shape
        cols = math.prod(shape[1:])
        if len(a) != 2 or len(b) != 2 or b[0] != shape[0] or a[1] != cols or a[0] != b[1]:
            raise bad("B", f"B of {shape[0]}×r and A of r×{cols} for shape {list(shape)}")
    if enc == "sparse" and {"indices", "values"} <= set(keys):
        i, v = f.entries[keys["indices"]].shape, f.entries[keys["values"]].shape
        if tuple(i) != tuple(v):
            raise bad("values", f"as many values as indices ({list(i)})")
