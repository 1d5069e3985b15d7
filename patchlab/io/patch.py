"""patchlab's on-disk patch format: a versioned manifest plus safetensors shards.

A patch directory::

    patch.json                      manifest: format version, provenance, one entry per tensor
    delta-00001-of-00002.safetensors
    fixups.safetensors              (optional) exact-reconstruction residuals, see below
    finetune/                       config, generation config and tokenizer files of the fine-tune

Each tensor entry has an ``op``: ``add`` (a delta, in one of several *encodings*), ``set`` (a value that
replaces the base's: integer buffers, tensors only the fine-tune has) or ``delete`` (a tensor only the base
has). Encodings of an ``add``: ``dense`` (ΔW), ``lowrank`` (ΔW = scale·B·A) and ``sparse`` (flat indices +
values). Any encoding yields dense rows of ΔW on demand (``PatchTensor.rows``), so no consumer ever
densifies a whole patch.

Exactness: ``cast(base + Δ)`` reproduces the fine-tune for all but a handful of elements (signed zeros,
wide exponent gaps). Extract records those elements as ``fix`` residuals together with a digest of the base
tensor; ``apply`` with α = 1 onto that same base tensor writes them back, which makes the round trip exact.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from patchlab.errors import PatchFormatError
from patchlab.io.safetensors import MappedFile

FORMAT = "patchlab.io.patch"
FORMAT_VERSION = 1
MANIFEST = "patch.json"
FINETUNE_DIR = "finetune"
FIXUPS_FILE = "fixups.safetensors"
ENCODINGS = ("dense", "lowrank", "sparse")
OPS = ("add", "set", "delete")


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
    def nrows(self) -> int:
        return self.shape[0] if self.shape else 1

    def _t(self, role: str) -> torch.Tensor:
        return self._patch._tensor(self.meta["file"], self.meta["keys"][role])

    def rows(
        self, r0: int, r1: int, device: torch.device | str = "cpu", out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense fp32 rows ``[r0, r1)`` of ΔW (or of the value, for ``set``).

        Rows of ``add`` entries are the caller's own to modify: read (into ``out`` when it is given and
        matches the stored rows' shape and dtype) or computed afresh, never a view of the file.
        """
        if self.op == "set":
            return self._slice(self._t("value"), r0, r1).to(device).float()
        if self.op != "add":
            raise PatchFormatError(f"tensor {self.name!r} is deleted by the patch; it has no rows")
        enc = self.encoding
        if enc == "dense":
            if not self.shape:
                return self._t("delta").to(device, torch.float32, copy=True)
            f, key = self._patch._file(self.meta["file"]), self.meta["keys"]["delta"]
            want = (min(r1, self.shape[0]) - r0, *self.shape[1:])
            fits = out is not None and tuple(out.shape) == want and out.dtype == f.entries[key].dtype
            return f.rows(key, r0, r1, out if fits else None).to(device).float()
        if enc == "lowrank":
            b = self._t("B")[r0:r1].to(device).float()
            a = self._t("A").to(device).float()
            return (b @ a).mul_(float(self.meta.get("scale", 1.0))).reshape((r1 - r0, *self.shape[1:]))
        if enc == "sparse":
            return self._sparse_rows(r0, r1, device)
        raise PatchFormatError(f"tensor {self.name!r} has unknown encoding {enc!r}; upgrade patchlab")

    def _slice(self, t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        return t if not self.shape else t[r0:r1]

    def _sparse_rows(self, r0: int, r1: int, device: torch.device | str) -> torch.Tensor:
        row = math.prod(self.shape[1:]) if self.shape else 1
        idx = self._t("indices")
        lo, hi = r0 * row, r1 * row
        a = int(torch.searchsorted(idx, torch.tensor(lo, dtype=idx.dtype)))
        b = int(torch.searchsorted(idx, torch.tensor(hi, dtype=idx.dtype)))
        out = torch.zeros((r1 - r0) * row, dtype=torch.float32, device=device)
        if b > a:
            out[(idx[a:b] - lo).to(device)] = self._t("values")[a:b].to(device).float()
        return out.reshape((r1 - r0, *self.shape[1:])) if self.shape else out.reshape(())

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.rows(0, self.nrows, device)

    @property
    def fix(self) -> dict | None:
        return self.meta.get("fix")

    def fixups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices, exact values in the checkpoint dtype) of the residuals, if any."""
        f = self.meta["fix"]
        return self._patch._tensor(FIXUPS_FILE, f["indices"]), self._patch._tensor(FIXUPS_FILE, f["values"])


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
        for name, meta in manifest.get("tensors", {}).items():
            if meta.get("op") not in OPS or meta.get("encoding", "dense") not in ENCODINGS:
                raise PatchFormatError(f"{mpath}: tensor {name!r} has op/encoding this patchlab does not know")
            for role, key in meta.get("keys", {}).items():
                f = p._file(meta["file"])
                if key not in f.entries:
                    raise PatchFormatError(
                        f"{path / meta['file']} lacks {key!r} ({role} of {name!r}); the patch is damaged"
                    )
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
