"""``tuco_summary``: the statistics ``patchlab tuco`` prints, computed in the library."""

from __future__ import annotations

import numpy as np
import pytest

from patchlab.errors import PatchlabError
from patchlab.measure.tuco import tuco_summary


def test_summary_matches_numpy():
    values = [0.31, 0.02, 0.77, 0.5, 0.12, 0.95, 0.4]
    s = tuco_summary(values)
    assert list(s) == ["n", "mean", "min", "max", "p10", "p25", "p50", "p75", "p90"]
    assert s["n"] == 7 and s["min"] == 0.02 and s["max"] == 0.95
    assert s["mean"] == pytest.approx(np.mean(values))
    for q in (10, 25, 50, 75, 90):
        assert s[f"p{q}"] == pytest.approx(np.quantile(values, q / 100))


def test_one_value_and_none():
    assert tuco_summary([0.25]) == {"n": 1, "mean": 0.25, "min": 0.25, "max": 0.25,
                                    "p10": 0.25, "p25": 0.25, "p50": 0.25, "p75": 0.25, "p90": 0.25}  # fmt: skip
    with pytest.raises(PatchlabError, match="no TuCo values"):
        tuco_summary([])
