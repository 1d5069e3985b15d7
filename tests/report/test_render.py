"""Report rendering: JSON/Markdown/self-contained HTML from a report dict."""

from __future__ import annotations

import json
import re

import pytest

from patchlab.kernels.drift import DriftStats, IntruderStats
from patchlab.measure.diagnose import PortDiagnostics, TensorDiagnostics
from patchlab.measure.flips import compare
from patchlab.measure.results import EvalResult, InstanceResult, summarise
from patchlab.measure.tuco import TuCoReport, TuCoResult
from patchlab.measure.verdict import port_verdict
from patchlab.report.render import build_report, hbar_svg, render
from tests.measure.test_flips import NEW_GEN, NEW_MC, OLD_GEN, OLD_MC


def drift(rel_delta: float) -> DriftStats:
    return DriftStats(10, rel_delta, 10.0, 1.0, rel_delta, rel_delta / 10, 0.1)


@pytest.fixture()
def report():
    overall = drift(0.4)
    diag = PortDiagnostics(
        patch="p",
        source="v1",
        target="v2",
        tensors=[
            TensorDiagnostics(
                "model.layers.0.q_proj.weight",
                "compared",
                0,
                [4, 4],
                [4, 4],
                drift(0.3),
                IntruderStats(10, 0.5, 1, [0], [0.2] + [0.9] * 9),
            ),
            TensorDiagnostics("model.layers.1.mlp.up_proj.weight", "missing-in-target", 1, [4, 4], None),
        ],
        per_layer={"0": drift(0.3), "1": drift(0.5)},
        overall=overall,
        only_in_target=["model.layers.0.q_norm.weight"],
        structural_share=0.25,
        intruder_matrices=1,
        intruder_matrix_share=1.0,
        verdict=port_verdict(overall, structural_share=0.25, structural_examples=["model.layers.1.mlp.up_proj.weight"]),
    )
    flips = compare(OLD_MC + OLD_GEN, NEW_MC + NEW_GEN)
    inst = [InstanceResult("<b>task</b>", "1", "multiple_choice", 0, 0, True, -1.0)]
    ev = EvalResult("m", summarise(inst), inst)
    tuco = TuCoReport(
        "v1", "ft", [TuCoResult("p0", 0.25, 3.0, 1.0, [0.1, 0.25], 5), TuCoResult("p1", 0.5, 1.0, 1.0, [0.5, 0.5], 3)]
    )
    return build_report(
        title="ft-v1 → v2",
        diagnostics=diag,
        flips=flips,
        evaluations={"old": ev, "new": ev},
        tuco=tuco,
        notes=["a note"],
        meta={"patch": "ft.patch"},
    )


def test_json_round_trips(report):
    again = json.loads(render(report, "json"))
    assert again == json.loads(json.dumps(report))
    assert again["flips"]["groups"]["mc"]["nfr"] == pytest.approx(1 / 6)
    assert again["evaluations"]["old"]["n_instances"] == 1


def test_markdown_has_verdict_tables_and_values(report):
    md = render(report, "md")
    assert md.startswith("# ft-v1 → v2")
    assert "## Verdict: **do not port**" in md
    assert "model.layers.1.mlp.up_proj.weight" in md and "only-in-target" in md
    # flips row for the MC group: N=6, NFR 1/6 = 16.7%, NFR_mc 2/6 = 33.3%, BTC 2/3
    row = next(line for line in md.splitlines() if line.startswith("| mc |"))
    assert "| 6 |" in row and "16.7%" in row and "33.3%" in row and "0.667" in row
    assert "| gen | 4 | 50.0% | 25.0% | 0.7 | 0.5 |" in md  # MUSCLE: PFR, NFR, m_g, m_r
    assert "mean 0.375, min 0.25, p10 0.275, median 0.375, p90 0.475, max 0.5 over 2 prompts" in md
    assert "&lt;b&gt;task&lt;/b&gt;" in md and "<b>" not in md  # no raw HTML leaks into Markdown


def test_html_is_self_contained_and_escaped(report):
    page = render(report, "html")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 3  # per-layer drift, flip rates, TuCo
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)\s*=", page) and "http" not in page and "url(" not in page
    assert "&lt;b&gt;task&lt;/b&gt;" in page and "<b>task</b>" not in page
    assert 'class="verdict stop"' in page


def test_svg_bars_scale_with_values():
    svg = hbar_svg(["a", "b"], {"x": [1.0, 0.5]})
    widths = [float(w) for w in re.findall(r'<rect x="170" y="[\d.]+" width="([\d.]+)"', svg)]
    assert widths == [pytest.approx(360.0), pytest.approx(180.0)]


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown report format"):
        render(build_report(), "pdf")
    with pytest.raises(ValueError, match="not a patchlab report"):
        render({"title": "x"}, "md")
    with pytest.raises(TypeError, match="cannot put"):
        build_report(flips=object())
    empty = render(build_report(), "md")
    assert empty.startswith("# patchlab compatibility report")


def test_quantile_matches_numpy():
    import numpy as np

    from patchlab.measure.results import quantile

    v = [0.3, 0.1, 0.7, 0.2, 0.9, 0.45]
    for q in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        assert quantile(v, q) == pytest.approx(float(np.quantile(v, q)))
    assert quantile([0.4], 0.9) == 0.4
