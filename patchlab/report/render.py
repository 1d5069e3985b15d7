"""Compatibility report: one dict assembled from the pieces, rendered as JSON, Markdown or HTML.

Pure functions: :func:`build_report` turns result objects (or their ``to_json()`` dicts) into a plain,
JSON-serialisable dict; :func:`render` turns that dict into text. The HTML is self-contained: inline CSS
and SVG charts, no JavaScript, no external references.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from patchlab.measure.results import quantile

REPORT_FORMAT = "patchlab-report"
REPORT_FORMAT_VERSION = 1
FORMATS = ("json", "md", "html")
MAX_IDS = 20
MAX_ROWS = 60


def _as_dict(x: Any) -> Any:
    if x is None or isinstance(x, dict):
        return x
    if hasattr(x, "to_json"):
        return x.to_json()
    raise TypeError(f"cannot put a {type(x).__name__} in a report; pass a result object or its to_json() dict")


def build_report(
    *,
    title: str = "patchlab compatibility report",
    diagnostics: Any = None,
    flips: Any = None,
    evaluations: Mapping[str, Any] | None = None,
    tuco: Any = None,
    plan: Any = None,
    notes: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a report dict; evaluations keep their per-task summaries (instances live in the results)."""
    evals = None
    if evaluations:
        evals = {}
        for name, res in evaluations.items():
            d = _as_dict(res)
            evals[name] = {"model": d.get("model"), "tasks": d["tasks"], "n_instances": len(d.get("instances", []))}
    if plan is not None and not isinstance(plan, dict):
        plan = plan.summary() if hasattr(plan, "summary") else _as_dict(plan)
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "title": title,
        "meta": dict(meta or {}),
        "notes": list(notes),
        "diagnostics": _as_dict(diagnostics),
        "flips": _as_dict(flips),
        "evaluations": evals,
        "tuco": _as_dict(tuco),
        "plan": plan,
    }


def render(report: Mapping[str, Any], fmt: str = "md") -> str:
    """Render a report dict as ``json``, ``md`` (Markdown) or ``html``."""
    if report.get("format") != REPORT_FORMAT:
        raise ValueError(f"not a patchlab report dict (format={report.get('format')!r}); build it with build_report")
    if fmt == "json":
        return json.dumps(report, indent=2, sort_keys=True, default=str)
    if fmt in ("md", "markdown"):
        return render_markdown(report)
    if fmt == "html":
        return render_html(report)
    raise ValueError(f"unknown report format {fmt!r}; use one of {FORMATS}")


# ---- shared table content ---------------------------------------------------------------------------


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _shape(s: Sequence[int] | None) -> str:
    return "–" if s is None else "×".join(str(d) for d in s) or "scalar"


def _ids(ids: Sequence[str]) -> str:
    shown = ", ".join(str(i) for i in ids[:MAX_IDS])
    return shown + (f" … (+{len(ids) - MAX_IDS})" if len(ids) > MAX_IDS else "") if ids else "–"


def _tables(report: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(heading, header, rows, caption) of every table, in order; shared by Markdown and HTML."""
    out: list[tuple[str, list[str], list[list[str]], str]] = []
    p = report.get("plan")
    if p:
        out.append(_plan_table(p))
    d = report.get("diagnostics")
    if d:
        o = d["overall"]
        out.append(
            (
                "Weight-space drift (overall)",
                ["‖base_t − base_s‖", "‖Δ‖", "drift / ‖Δ‖", "drift / ‖base_s‖", "cos(drift, Δ)", "parameters"],
                [
                    [
                        _num(o["drift_norm"]),
                        _num(o["delta_norm"]),
                        _num(o["drift_rel_delta"]),
                        _num(o["drift_rel_base"]),
                        _num(o["cos_drift_delta"]),
                        _num(o["numel"]),
                    ]
                ],
                f"source {d.get('source')}, target {d.get('target')}",
            )
        )
        rows = [
            [k, _num(v["drift_rel_delta"]), _num(v["drift_rel_base"]), _num(v["cos_drift_delta"]), _num(v["numel"])]
            for k, v in d["per_layer"].items()
        ]
        out.append(
            ("Drift per layer", ["layer", "drift / ‖Δ‖", "drift / ‖base_s‖", "cos(drift, Δ)", "parameters"], rows, "")
        )
        struct = [
            [t["name"], t["status"], _shape(t["shape_source"]), _shape(t["shape_target"]), t.get("note", "")]
            for t in d["tensors"]
            if t["status"] != "compared"
        ]
        struct += [[n, "only-in-target", "–", "", ""] for n in d.get("only_in_target", [])]
        if struct:
            out.append(
                (
                    "Structural differences",
                    ["tensor", "status", "source shape", "target shape", "note"],
                    struct[:MAX_ROWS],
                    f"{_pct(d['structural_share'])} of the patch's parameters are on missing or reshaped tensors",
                )
            )
        intr = [
            [
                t["name"],
                str(t["intruders"]["n_intruders"]),
                ", ".join(_num(s, 2) for s in t["intruders"]["max_similarity"]),
            ]
            for t in d["tensors"]
            if t.get("intruders") and t["intruders"]["n_intruders"] > 0
        ]
        out.append(
            (
                "Intruder dimensions",
                ["matrix", "intruders", "max |cos| of the top singular vectors"],
                intr[:MAX_ROWS],
                f"{len(intr)} of {d.get('intruder_matrices', 0)} analysed matrices carry intruder dimensions "
                f"(k={d.get('settings', {}).get('intruder_k')}, ε={d.get('settings', {}).get('epsilon')})",
            )
        )
    ev = report.get("evaluations")
    if ev:
        names = list(ev)
        tasks = sorted({t for e in ev.values() for t in e["tasks"]})
        rows = []
        for t in tasks:
            row = [t]
            for n in names:
                s = ev[n]["tasks"].get(t)
                row.append(_pct(s["accuracy"]) if s else "–")
            rows.append(row)
        out.append(("Accuracy", ["task", *names], rows, ""))
    f = report.get("flips")
    if f:
        groups = list(f["groups"].items()) + [("overall", f["overall"])]
        rows = [
            [
                g,
                _num(s["n"]),
                _pct(s["accuracy_old"]),
                _pct(s["accuracy_new"]),
                _pct(s["nfr"]),
                _pct(s["pfr"]),
                _pct(s["nfr_mc"]),
                _num(s["btc"]),
                _num(s["bec"]),
                f"{s['n_only_old']}/{s['n_only_new']}",
            ]
            for g, s in groups
        ]
        out.append(
            (
                "Negative flips",
                ["task", "N", "acc old", "acc new", "NFR", "PFR", "NFR_mc", "BTC", "BEC", "missing old/new"],
                rows,
                "NFR: old right, new wrong; PFR: old wrong, new right; NFR_mc: new wrong with a different answer",
            )
        )
        m_rows = [
            [
                g,
                _num(s["muscle"]["n"]),
                _pct(s["muscle"]["pfr"]),
                _pct(s["muscle"]["nfr"]),
                _num(s["muscle"]["mean_gain"]),
                _num(s["muscle"]["mean_regression"]),
                _num(s["muscle"]["mean_difference"]),
            ]
            for g, s in groups
            if s.get("muscle")
        ]
        if m_rows:
            out.append(
                (
                    "Generative score changes (MUSCLE)",
                    ["task", "N", "PFR (D>0)", "NFR (D<0)", "mean gain", "mean regression", "mean D"],
                    m_rows,
                    f"D = S(new) − S(old), tolerance {_num(f.get('tolerance'))}",
                )
            )
        nf_rows = [[g, _ids(s["negative_flip_ids"]), _ids(s["positive_flip_ids"])] for g, s in f["groups"].items()]
        out.append(("Flipped instances", ["task", "negative flips", "positive flips"], nf_rows, ""))
    tc = report.get("tuco")
    if tc:
        res = tc["results"]
        vals = [r["tuco"] for r in res]
        rows = [[r["id"], _num(r["tuco"]), _num(r["ptc_l1"]), _num(r["ftc_l1"]), _num(r["n_tokens"])] for r in res]
        cap = (
            f"mean {_num(sum(vals) / len(vals))}, min {_num(min(vals))}, p10 {_num(quantile(vals, 0.1))}, "
            f"median {_num(quantile(vals, 0.5))}, p90 {_num(quantile(vals, 0.9))}, max {_num(max(vals))} "
            f"over {len(vals)} prompts"
            if vals
            else "no prompts"
        )
        out.append(("TuCo per prompt", ["prompt", "TuCo", "‖ΣPTC‖₁", "‖ΣFTC‖₁", "tokens"], rows[:MAX_ROWS], cap))
    return out


def _plan_table(p: Mapping[str, Any]) -> tuple[str, list[str], list[list[str]], str]:
    """The port's plan summary (``Plan.summary()``): tensors and parameters per action, then the rest."""
    tensors, params = p.get("tensors"), p.get("parameters")
    if isinstance(tensors, Mapping) and isinstance(params, Mapping):
        rows = [[str(a), _num(n), _num(params.get(a))] for a, n in tensors.items()]
        extra = []
        if p.get("unused_tensors"):
            extra.append(f"{p['unused_tensors']} patch tensors unused ({_num(p.get('unused_parameters'))} parameters)")
        if p.get("vocab_policies"):
            extra.append("vocabulary rows: " + ", ".join(map(str, p["vocab_policies"])))
        extra += [f"warning: {w}" for w in p.get("warnings") or ()]
        return "Port plan", ["action", "tensors", "parameters"], rows, "; ".join(extra) or "every patch tensor is used"
    rows = [[str(k), json.dumps(v, default=str) if isinstance(v, (dict, list)) else _num(v)] for k, v in p.items()]
    return "Port plan", ["item", "value"], rows, ""


# ---- Markdown ---------------------------------------------------------------------------------------


def _md_text(s: Any) -> str:
    return str(s).replace("<", "&lt;").replace(">", "&gt;")


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# {_md_text(report.get('title', 'patchlab compatibility report'))}", ""]
    for k, v in (report.get("meta") or {}).items():
        lines.append(f"- **{_md_text(k)}**: {_md_text(v)}")
    if report.get("meta"):
        lines.append("")
    d = report.get("diagnostics")
    if d:
        lines += [f"## Verdict: **{d['verdict']['level']}**", ""]
        lines += [f"- {_md_text(r)}" for r in d["verdict"]["reasons"]] + [""]
    for n in report.get("notes") or []:
        lines += [f"> {_md_text(n)}", ""]
    for heading, header, rows, caption in _tables(report):
        lines += [f"## {heading}", ""]
        if caption:
            lines += [caption, ""]
        if not rows:
            lines += ["(none)", ""]
            continue
        lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---- HTML + SVG -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:70rem;color:#222;
padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}.cap{color:#555;font-size:.85rem}
.verdict{padding:.75rem 1rem;border-radius:.4rem;font-weight:600}
.safe{background:#e3f6e5}.care{background:#fff4d6}.stop{background:#fde2e1}
svg text{font-size:11px;fill:#333}
"""
_COLORS = ("#4e79a7", "#e15759", "#59a14f", "#f28e2b")


def hbar_svg(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str = "",
    fmt: str = "{:.3g}",
    colors: Sequence[str] | None = None,
    marks: Mapping[str, float] | None = None,
) -> str:
    """Horizontal grouped bar chart as an inline SVG string (no external references); ``marks`` draws
    labelled dashed vertical lines (thresholds, or the end of a bounded scale)."""
    names = list(series)
    palette = list(colors or _COLORS)
    values = [[(v if v is not None and math.isfinite(v) else 0.0) for v in series[n]] for n in names]
    marks = {k: v for k, v in (marks or {}).items() if v is not None and math.isfinite(v)}
    vmax = max([abs(v) for vs in values for v in vs] + list(marks.values()) + [1e-12])
    label_w, bar_w, bar_h, gap = 170, 360, 12, 8
    row_h = bar_h * len(names) + gap
    legend_h = 18 if len(names) > 1 else 0
    top = 22 + legend_h
    height = top + row_h * len(labels) + (24 if marks else 10)
    width = label_w + bar_w + 90
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="0" y="14" style="font-weight:600">{html.escape(title)}</text>',
    ]
    for j, n in enumerate(names if legend_h else []):
        x = label_w + j * 120
        parts.append(f'<rect x="{x}" y="22" width="10" height="10" fill="{palette[j % len(palette)]}"/>')
        parts.append(f'<text x="{x + 14}" y="31">{html.escape(n)}</text>')
    for i, lab in enumerate(labels):
        y0 = top + i * row_h
        short = lab if len(lab) <= 28 else lab[:26] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y0 + row_h / 2}" text-anchor="end">{html.escape(short)}</text>')
        for j in range(len(names)):
            v = values[j][i]
            w = bar_w * abs(v) / vmax
            y = y0 + j * bar_h
            parts.append(
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{palette[j % len(palette)]}"/>'
            )
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 3}">{html.escape(fmt.format(v))}</text>')
    parts.append(f'<line x1="{label_w}" y1="{top - 2}" x2="{label_w}" y2="{height - 8}" stroke="#999"/>')
    for k, v in marks.items():
        x = label_w + bar_w * abs(v) / vmax
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 16}" stroke="#555" stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<text x="{x:.1f}" y="{height - 4}" text-anchor="middle" style="font-size:10px">{html.escape(k)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _charts(report: Mapping[str, Any]) -> dict[str, str]:
    """SVG charts keyed by the table heading they follow."""
    charts: dict[str, str] = {}
    d = report.get("diagnostics")
    if d and d.get("per_layer"):
        labs = list(d["per_layer"])
        charts["Drift per layer"] = hbar_svg(
            [f"layer {k}" if k != "other" else "other" for k in labs],
            {"drift / ‖Δ‖": [d["per_layer"][k]["drift_rel_delta"] for k in labs]},
            title="Base drift relative to the patch, per layer",
            marks={
                "care": d["verdict"].get("thresholds", {}).get("layer_rel_delta_care"),
                "do not port": d["verdict"].get("thresholds", {}).get("layer_rel_delta_stop"),
            },
        )
    f = report.get("flips")
    if f and f.get("groups"):
        labs = list(f["groups"])
        charts["Negative flips"] = hbar_svg(
            labs,
            {"NFR": [f["groups"][g]["nfr"] for g in labs], "PFR": [f["groups"][g]["pfr"] for g in labs]},
            title="Flip rates per task",
            fmt="{:.1%}",
            colors=("#e15759", "#59a14f"),
        )
    tc = report.get("tuco")
    if tc and tc.get("results"):
        res = tc["results"][:MAX_ROWS]
        charts["TuCo per prompt"] = hbar_svg(
            [r["id"] for r in res],
            {"TuCo": [r["tuco"] for r in res]},
            title="TuCo per prompt (share of the last state due to fine-tuning, 0 to 1)",
            marks={"1": 1.0},
        )
    return charts


def render_html(report: Mapping[str, Any]) -> str:
    e = html.escape
    title = report.get("title", "patchlab compatibility report")
    body = [f"<h1>{e(title)}</h1>"]
    meta = report.get("meta") or {}
    if meta:
        body.append("<ul>" + "".join(f"<li><b>{e(str(k))}</b>: {e(str(v))}</li>" for k, v in meta.items()) + "</ul>")
    d = report.get("diagnostics")
    if d:
        level = d["verdict"]["level"]
        cls = {"safe to port": "safe", "port with care": "care"}.get(level, "stop")
        body.append(f'<div class="verdict {cls}">Verdict: {e(level)}</div>')
        body.append("<ul>" + "".join(f"<li>{e(r)}</li>" for r in d["verdict"]["reasons"]) + "</ul>")
    for n in report.get("notes") or []:
        body.append(f"<p><i>{e(n)}</i></p>")
    charts = _charts(report)
    for heading, header, rows, caption in _tables(report):
        body.append(f"<h2>{e(heading)}</h2>")
        if caption:
            body.append(f'<p class="cap">{e(caption)}</p>')
        if rows:
            body.append(
                "<table><tr>"
                + "".join(f"<th>{e(h)}</th>" for h in header)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
        else:
            body.append("<p>(none)</p>")
        if heading in charts:
            body.append(charts[heading])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
