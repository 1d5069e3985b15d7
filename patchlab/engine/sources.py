"""Delta sources: where the ΔW rows of an apply or port come from.

``PatchDelta`` reads a stored patch (any encoding); ``PairDelta`` computes ``ft − base`` on the fly, which is
what makes the fused port ``target + α·(ft − base)`` a single streaming pass that never writes Δ.
Both answer the same two questions: what entries exist (for planning), and the dense fp32 rows of one
entry for a row map (for execution). Rows of ``add`` entries are the caller's own for the chunk in hand
(fresh, or engine scratch), so an apply scales and accumulates into them in place.

An exact patch stored narrower than fp32 (extract's default for a bf16 model) holds Δ rounded to its dtype
plus residuals ("fixups") that restore the fine-tune: ``write_fixups`` writes them into an output chunk (apply,
port), and ``PatchDelta.exact_rows`` gives back the exact ``float(ft) − float(base)`` from the base's rows
(merge on the patches' own base).
"""

from __future__ import annotations

from pathlib import Path

import torch

from patchlab.encodings import codec
from patchlab.engine.executor import scratch
from patchlab.io.checkpoint import Checkpoint
from patchlab.io.patch import Patch, PatchTensor, tensor_digest
from patchlab.kernels.delta import bits, diff, diff_into, gather_rows
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


Fixups = tuple[str | None, torch.Tensor, torch.Tensor, torch.Tensor | None]  # digest, indices, values, base values


def write_fixups(
    outc: torch.Tensor, tr: torch.Tensor, fix: Fixups, state: dict[str, object], whole: torch.Tensor, lo: int, hi: int
) -> None:
    """Write the residuals falling in flat elements ``[lo, hi)`` of the output chunk ``outc``.

    With the base's values recorded, a residual is written where the target chunk ``tr`` holds exactly that
    value; older patches carry a digest of the whole base tensor instead, checked once against ``whole``.
    ``state`` (one dict per tensor, shared by its chunks) caches that check and whether the indices are sorted.
    """
    digest, idx, vals, base_vals = fix
    if base_vals is None:
        if "ok" not in state:  # the residuals are only valid on the exact base tensor they came from
            state["ok"] = tensor_digest(whole) == digest
        if not state["ok"]:
            return
    elif base_vals.dtype != tr.dtype:
        return  # a target of another dtype never holds the base's values
    if "sorted" not in state:  # extract writes them sorted; a hand-made patch may not
        state["sorted"] = idx.numel() < 2 or bool((idx[1:] >= idx[:-1]).all())
    if state["sorted"]:
        a, b = (int(torch.searchsorted(idx, v)) for v in (lo, hi))
        at, to = idx[a:b].long() - lo, vals[a:b]
        was = base_vals[a:b] if base_vals is not None else None
    else:
        sel = (idx >= lo) & (idx < hi)
        at, to = idx[sel].long() - lo, vals[sel]
        was = base_vals[sel] if base_vals is not None else None
    if not at.numel():
        return
    dev = outc.device
    at = at.to(dev)
    to = to.to(dev)
    if was is not None:
        keep = bits(tr.reshape(-1)[at]) == bits(was.to(dev))
        if not bool(keep.all()):  # on the patch's own base they all apply: compacting costs more than the rest
            at, to = at[keep], to[keep]
    bits(outc.reshape(-1)).index_copy_(0, at, bits(to.to(outc.dtype)))


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

    def fixups(self, name: str) -> Fixups | None:
        """(base digest, flat indices, values, base values there) of an entry's residuals, or None."""
        e = self.patch.entry(name)
        if not e.fix:
            return None
        idx, vals = e.fixups()
        return e.fix.get("base_digest"), idx, vals, e.fixup_base()

    def rounded(self, name: str) -> bool:
        """Whether entry ``name`` stores the exact Δ rounded to a dtype narrower than fp32, with the residuals
        that restore the fine-tune: an ``exact`` patch's dense ``add`` entry stored in its fine-tune's own
        (16-bit) dtype. ``exact_rows`` gives its exact Δ back on the patch's base; fp32 entries already hold it,
        low-rank and sparse ones never did."""
        params = self.patch.provenance.get("parameters") or {}
        if params.get("exact") is not True:
            return False
        e = self.patch.entry(name)
        if e.op != "add" or e.encoding != "dense" or e.meta.get("rows"):
            return False
        sd = e.stored_dtype("delta")
        return sd.is_floating_point and sd.itemsize < 4 and sd == e.dtype

    def exact_rows(
        self,
        name: str,
        r0: int,
        r1: int,
        base: torch.Tensor,
        base32: torch.Tensor,
        out: torch.Tensor,
        fix: Fixups | None,
        state: dict[str, object],
        whole: torch.Tensor,
    ) -> torch.Tensor:
        """The exact Δ rows ``[r0, r1)`` of a ``rounded`` entry on the patch's own base, in fp32 in ``out``.

        ``base``: the base's rows ``[r0, r1)`` (``base32``: the same in fp32, on ``out``'s device); ``fix``:
        ``fixups(name)``; ``state`` and ``whole`` (the base tensor) as ``write_fixups``. The fine-tune's rows
        are rebuilt as ``apply`` writes them, ``cast(base + Δ)`` with the residuals where the base holds the
        recorded values, then ``float(ft) − float(base)``: what extract stores as an fp32 Δ, bit for bit (a
        difference of two bf16 values is exact in fp32, so the rounding ``Δ`` went through is undone).
        """
        e = self.patch.entry(name)
        shape, dev = tuple(out.shape), out.device
        if e.shape:
            raw = e.stored_rows("delta", r0, r1, scratch("patch.raw", shape, e.stored_dtype("delta")))
        else:
            raw = e.stored("delta")
        ft = scratch("patch.ft", shape, e.dtype, dev)
        if base.dtype == raw.dtype == e.dtype and base.device == dev:
            # 16-bit + 16-bit is computed in fp32 and rounded once: cast(float(base) + float(Δ)) in one pass
            torch.add(base.reshape(shape), raw.to(dev).reshape(shape), out=ft)
        else:
            ft.copy_(out.copy_(raw).add_(base32))
        if fix is not None:
            row = e.numel // e.shape[0] if e.shape else 1
            write_fixups(ft, base, fix, state, whole, r0 * row, r1 * row)
        return out.copy_(ft).sub_(base32)

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
