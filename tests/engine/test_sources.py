"""engine.sources: the exact Δ of a 16-bit exact patch, rebuilt from the base's rows and the residuals."""

from __future__ import annotations

import torch

import patchlab
from patchlab.engine.sources import PatchDelta
from patchlab.io.checkpoint import Checkpoint
from tests.factory import make_model


def test_exact_rows_give_ft_minus_base_in_fp32_and_only_rounded_entries_qualify(tmp_path):
    base = make_model(tmp_path / "b", seed=0, dtype=torch.bfloat16)
    ft = make_model(tmp_path / "f", from_model=base, noise=0.01, dtype=torch.bfloat16)
    src = PatchDelta(patchlab.extract(base, ft, tmp_path / "p16"))
    wide = PatchDelta(patchlab.extract(base, ft, tmp_path / "p32", storage_dtype="float32"))
    narrow = PatchDelta(patchlab.extract(base, ft, tmp_path / "pf16", storage_dtype="float16"))  # not exact
    b_ck, f_ck = Checkpoint.open(base), Checkpoint.open(ft)
    fixed = 0
    for e in src.patch.entries():
        if e.op != "add":
            continue
        assert src.rounded(e.name) and not wide.rounded(e.name) and not narrow.rounded(e.name)
        b = b_ck.tensor(e.name).clone()
        want = f_ck.tensor(e.name).float() - b.float()
        n = e.shape[0]
        for r0 in range(0, n, 7):  # uneven chunks: the residuals are found by their flat positions
            r1 = min(r0 + 7, n)
            out = torch.empty((r1 - r0, *e.shape[1:]))
            got = src.exact_rows(
                e.name, r0, r1, b[r0:r1], b[r0:r1].float(), out, src.fixups(e.name), {}, b_ck.tensor(e.name)
            )
            assert torch.equal(got.view(torch.int32), want[r0:r1].contiguous().view(torch.int32)), e.name
        fixed += bool(e.fix)
        # the rounded Δ alone does not give it back: the residuals matter
        assert not e.fix or not torch.equal(e.dense(), want)
    assert fixed > 3
