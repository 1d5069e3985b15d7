"""Delta sources: where the ΔW rows of an apply or port come from.

``PatchDelta`` reads a stored patch (any encoding); ``PairDelta`` computes ``ft − base`` on the fly, which is
what makes the fused port ``target + α·(ft − base)`` a single streaming pass that never writes Δ.
Both answer the same two questions: what entries exist (for planning), and the dense fp32 rows of one
entry for a row map (for execution). Rows of ``add`` entries are the caller's own for the chunk in hand
(fresh, or engine scratch), so an apply scales and accumulates into them in place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from patchlab.encodings import codec
from patchlab.engine.executor import scratch
from patchlab.io.checkpoint import Checkpoint
from patchlab.io.patch import Patch, PatchTensor
from patchlab.kernels.delta import diff, diff_into, gather_rows
from patchlab.plan import DeltaEntry, DeltaView, Plan, plan_extract


def _gather_entry(e: PatchTensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``index`` (−1 → zeros) of one patch entry, without densifying the whole tensor."""
    ok = index >= 0
    out = torch.zeros((index.numel(), *e.shape[1:]), dtype=torch.float32, device=device)
    if not bool(ok.any()):
        return out
    idx = index[ok]
    if e.op == "add":
        vals = codec(e.encoding, str(e.name)).gather(e, idx, device)
    else:
        vals = e.stored("value")[idx].to(device).float()
    out[ok.to(device)] = vals.reshape((idx.numel(), *e.shape[1:]))
    return out


class PatchDelta:
    """A stored patch as a delta source."""

    def __init__(self, patch: Patch):
        self.patch = patch

    def view(self) -> DeltaView:
        ents = {
            n: DeltaEntry(m["op"], tuple(m["shape"]), m["dtype"]) for n, m in self.patch.manifest["tensors"].items()
        }
        return DeltaView(str(self.patch.path), ents, self.patch.source_vocab, self.patch.source_tied)

    def rows(
        self, name: str, r0: int, r1: int, device: torch.device, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        e = self.patch.entry(name)
        if index is not None:
            return _gather_entry(e, index[r0:r1], device)
        if e.op == "add" and e.encoding == "dense" and e.shape:  # a dense Δ is read into scratch, then widened
            shape = (min(r1, e.shape[0]) - r0, *e.shape[1:])
            sd = e.stored_dtype("delta")
            raw = e.stored_rows("delta", r0, r1, scratch("patch.raw", shape, sd))
            if sd == torch.float32:
                return raw.to(device)
            if device.type == "cpu":
                return scratch("patch.delta", shape, torch.float32).copy_(raw)
            return raw.to(device, non_blocking=True).float()
        return e.rows(r0, r1, device)

    def raw_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows of a ``set`` entry in their stored dtype (no float conversion: integer buffers stay exact)."""
        e = self.patch.entry(name)
        t = e.stored("value")
        return t[r0:r1] if e.shape else t

    def fixups(self, name: str) -> tuple[str | None, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(base digest, flat indices, values, base values there) of an entry's residuals, or None."""
        e = self.patch.entry(name)
        if not e.fix:
            return None
        idx, vals = e.fixups()
        return e.fix.get("base_digest"), idx, vals, e.fixup_base()

    @property
    def meta_dir(self) -> Path | None:
        d = self.patch.finetune_dir
        return d if d.exists() else None


class PairDelta:
    """``ft − base`` computed on demand, following an extract plan (row maps included)."""

    def __init__(self, finetuned: Checkpoint, base: Checkpoint, plan: Plan | None = None):
        self.ft, self.base = finetuned, base
        self.plan = plan or plan_extract(base, finetuned)
        self._steps = {s.name: s for s in self.plan.steps}

    def view(self) -> DeltaView:
        ents: dict[str, DeltaEntry] = {}
        for s in self.plan.steps:
            op = {"diff": "add", "set": "set", "delete": "delete"}[s.action]
            dtype = str(self.ft.info(s.name).dtype).removeprefix("torch.") if s.name in self.ft else s.dtype
            ents[s.name] = DeltaEntry(op, s.shape, dtype)
        return DeltaView(f"{self.ft.path} - {self.base.path}", ents, self.ft.vocab, self.ft.tied)

    def rows(
        self, name: str, r0: int, r1: int, device: torch.device, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        s = self._steps[name]
        ft_info, base_info = self.ft.info(name), (self.base.info(name) if name in self.base else None)
        bmap = self.plan.row_maps.get((name, "base"))
        if (
            s.action == "diff"
            and s.shape
            and index is None
            and bmap is None
            and r1 <= min(ft_info.shape[0], base_info.shape[0])
        ):  # the common case, once per chunk: read both into scratch, subtract in place
            shape = (r1 - r0, *s.shape[1:])
            f = self.ft.rows(name, r0, r1, scratch("pair.ft", shape, ft_info.dtype))
            b = self.base.rows(name, r0, r1, scratch("pair.base", shape, base_info.dtype))
            if device.type != "cpu":
                return diff(f.to(device), b.to(device))
            d, tmp = scratch("pair.delta", shape, torch.float32), scratch("pair.tmp", shape, torch.float32)
            return diff_into(d, f, b, tmp)
        rows = index[r0:r1] if index is not None else torch.arange(r0, r1)
        if s.action == "set":
            return (
                gather_rows(self.ft.tensor(name), rows).to(device)
                if s.shape
                else self.ft.tensor(name).float().to(device)
            )
        ft_t, base_t = self.ft.tensor(name), self.base.tensor(name)
        if not s.shape:
            return ft_t.to(device).float() - base_t.to(device).float()
        ft_rows = rows.clone()
        ft_rows[ft_rows >= ft_t.shape[0]] = -1
        base_rows = rows.clone()
        if bmap is not None:
            valid = base_rows >= 0
            base_rows[valid] = bmap[base_rows[valid]]
        base_rows[base_rows >= base_t.shape[0]] = -1
        return gather_rows(ft_t, ft_rows).to(device).sub_(gather_rows(base_t, base_rows).to(device))

    def raw_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        t = self.ft.tensor(name)
        return t[r0:r1] if t.dim() else t

    def fixups(self, name: str) -> None:
        return None

    @property
    def meta_dir(self) -> Path | None:
        return self.ft.path


DeltaSource = PatchDelta | PairDelta
