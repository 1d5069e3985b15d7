"""``patchlab evals ...``: evaluation results stored in the registry."""

# No "from __future__ import annotations": typer evaluates the option annotations.

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import (
    JsonOpt,
    KindOpt,
    RegistryOpt,
    console,
    err_console,
    escape,
    fmt_num,
    handled,
    open_registry,
    print_json,
    print_table,
)

evals_app = typer.Typer(help="Evaluation results stored in the registry.", no_args_is_help=True)


@evals_app.command("add")
@handled
def evals_add(
    ref: Annotated[str, typer.Argument(help="What was evaluated: a patch, family@version or derived:ID.")],
    result: Annotated[Path, typer.Argument(help="An evaluation result file (EvalResult.save / patchlab eval).")],
    kind: KindOpt = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Store an evaluation result file against a patch, base version or derived model (one entry per task)."""
    with open_registry(registry) as reg:
        infos = reg.record_eval_result(ref, result, kind=kind)
    if json_out:
        return print_json([e.to_dict() for e in infos])
    for e in infos:
        console().print(f"recorded evaluation {e.id}: {escape(e.target)} on {escape(e.dataset)} ({e.num_instances})")
    return None


@evals_app.command("ls")
@handled
def evals_ls(
    ref: Annotated[str | None, typer.Argument(help="Only evaluations of this patch/base/derived model.")] = None,
    kind: KindOpt = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List stored evaluations."""
    with open_registry(registry) as reg:
        items = reg.list_evaluations(ref, kind=kind)
    if json_out:
        return print_json([e.to_dict() for e in items])
    rows = [(str(e.id), e.target, e.dataset, str(e.num_instances), _metric(e.metrics), e.created_at) for e in items]
    if rows:
        print_table(("id", "target", "dataset", "n", "accuracy", "created"), rows)
    else:
        err_console().print("(no evaluations)")
    return None


def _metric(m: Any) -> str:
    v = (m or {}).get("accuracy") if isinstance(m, dict) else None
    return f"{v:.4f}" if isinstance(v, (int, float)) else ""


@evals_app.command("show")
@handled
def evals_show(
    evaluation_id: Annotated[int, typer.Argument(help="Evaluation id (see `patchlab evals ls`).")],
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """One evaluation with its per-instance results."""
    with open_registry(registry) as reg:
        e = reg.get_evaluation(evaluation_id)
    if json_out:
        return print_json(e.to_dict())
    console().print(
        f"evaluation {e.id}: [bold]{escape(e.target)}[/] on {escape(e.dataset)}, {e.num_instances} instances, "
        f"{escape(json.dumps(e.metrics, sort_keys=True))}"
    )
    rows = [
        (
            str(r["id"]),
            _short(r.get("prediction")),
            _short(r.get("gold")),
            str(r.get("correct")),
            fmt_num(r.get("score")),
        )
        for r in e.results
    ]
    if rows:
        print_table(("id", "prediction", "gold", "correct", "score"), rows)
    return None


def _short(v: Any, n: int = 40) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= n else s[: n - 1] + "…"
