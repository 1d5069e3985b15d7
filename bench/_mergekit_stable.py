"""``mergekit-yaml`` with a stable ``torch.argsort`` (run with mergekit's own python).

mergekit's magnitude trim keeps the top-k entries of ``torch.argsort(|Δ|, descending=True)``, which is not
stable: which of several equal magnitudes at the threshold it keeps is unspecified. patchlab keeps the
lowest flat indices, i.e. what a stable descending sort keeps. Deltas of bf16 checkpoints have many equal
magnitudes, so the two tools pick different tied entries. Running mergekit with a stable argsort removes
that one difference; ``bench/merge_bench.py --stable-check`` compares the result to patchlab's.
"""

import re
import sys

import torch

_argsort = torch.argsort


def _stable_argsort(input, dim=-1, descending=False, stable=False, **kw):  # noqa: A002 (torch's name)
    return _argsort(input, dim=dim, descending=descending, stable=True, **kw)


torch.argsort = _stable_argsort

from mergekit.scripts.run_yaml import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\.pyw|\.exe)?$", "", sys.argv[0])
    sys.exit(main())
