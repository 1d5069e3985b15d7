"""What storing Δ in the fine-tune's own dtype costs: the residual (fixup) share and the effect on a port.

For every tensor of a family (``src``, ``ft``, ``target``), in fp32:

- residual share: elements where ``cast(src + float(cast_ft(ft − src))) != ft`` (what extract stores as
  fixups, so that apply onto ``src`` stays bit-exact);
- port effect: ``cast(target + float(cast_ft(Δ)))`` against ``cast(target + Δ)`` (the port from an fp32 Δ,
  which equals the fused port), with residuals written where ``target == src`` as ``apply``/``port`` do:
  share of elements that differ, and the largest difference in ulps of the result's dtype (the distance
  between the two values in units of the fp32-reference value's ulp).

    python bench/native_delta.py --family /work/bench-data/llama-1b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of ``x``'s dtype at each value of ``x`` (fp32 result)."""
    fi = torch.finfo(x.dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[x.dtype]
    a = x.float().abs().clamp_min(fi.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(a)) - mant)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--src", type=Path, default=None, help="override: base checkpoint")
    ap.add_argument("--ft", type=Path, default=None)
    ap.add_argument("--target", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from patchlab.io.checkpoint import Checkpoint
    from patchlab.kernels.delta import bits

    src = Checkpoint.open(a.src or a.family / "src")
    ft = Checkpoint.open(a.ft or a.family / "ft")
    tgt = Checkpoint.open(a.target or a.family / "target") if (a.target or (a.family / "target").exists()) else None
    n = fix = diff = 0
    worst_ulps = 0.0
    worst_name = ""
    worst_rel = 0.0
    for name in ft.names:
        if name not in src or not ft.info(name).dtype.is_floating_point:
            continue
        f, s = ft.tensor(name), src.tensor(name)
        if f.shape != s.shape:
            continue
        d32 = f.float() - s.float()
        dn = d32.to(f.dtype).float()
        back = (s.float() + dn).to(f.dtype)
        bad = bits(back) != bits(f)
        n += f.numel()
        fix += int(bad.sum())
        if tgt is not None and name in tgt and tgt.info(name).shape == f.shape:
            t = tgt.tensor(name)
            ref = (t.float() + d32).to(t.dtype)
            got = (t.float() + dn).to(t.dtype)
            same_base = (bits(t) == bits(s)) & bad  # where port writes the residual (ft's value)
            got = torch.where(same_base, f.to(t.dtype), got)
            differ = bits(got) != bits(ref)
            diff += int(differ.sum())
            if bool(differ.any()):
                gap = (got.float() - ref.float()).abs()
                u = (gap / ulp(ref))[differ].max().item()
                if u > worst_ulps:
                    worst_ulps, worst_name = u, name
                # in ulps of the larger of target and result: a cancellation (target ≈ −Δ) makes the
                # result tiny and its own ulp meaningless as a yardstick
                big = torch.maximum(t.abs(), ref.abs())
                worst_rel = max(worst_rel, (gap / ulp(big))[differ].max().item())
    out = {
        "family": str(a.family),
        "elements": n,
        "fixups": fix,
        "fixup_share": fix / n if n else 0.0,
        "port_elements_differing": diff,
        "port_differing_share": diff / n if n else 0.0,
        "port_max_ulps": worst_ulps,
        "port_max_ulps_tensor": worst_name,
        "port_max_ulps_of_larger_operand": worst_rel,
    }
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
