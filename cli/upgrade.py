"""``patchlab upgrade FAMILY --to VERSION``: every live patch of a family follows a new base release, gated;
``patchlab upgrade status [RUN]``, ``patchlab upgrade ls``; ``patchlab watch FAMILY`` notices new releases and
runs the upgrade. A thin shell over ``registry.workflows.upgrade`` and ``registry.workflows.watch``.

Exit status of ``upgrade``: 0 every gate passed, 4 some patch failed its gate (it stays registered, its alias
does not move), 3 another run holds the lease, 1 an error (the run is resumable: run the same command again).
"""

# No "from __future__ import annotations": typer evaluates the option annotations.

from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from cli.common import (
    STATE,
    DeviceOpt,
    JsonOpt,
    RegistryOpt,
    VocabPolicyOpt,
    console,
    escape,
    fmt_pct,
    fmt_size,
    handled,
    open_registry,
    print_json,
    print_table,
    quiet_transformers,
    status,
)

GATE_FAILED_EXIT = 4


class DefaultRunGroup(TyperGroup):
    """``patchlab upgrade FAMILY ...`` runs an upgrade; ``upgrade status``/``upgrade ls`` are subcommands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


upgrade_app = typer.Typer(
    cls=DefaultRunGroup,
    help="Move every live patch of a family onto a new base release, gated (and show runs).",
    no_args_is_help=True,
)
app = typer.Typer()


def _log(json_out: bool):
    if json_out or STATE.quiet:
        return lambda s: None
    out = console()
    return lambda s: out.print(f"[dim]•[/] {escape(s)}")


def print_summary(summary: dict[str, Any]) -> None:
    rows = []
    for p in summary.get("patches", []):
        rows.append(
            (
                f"{p['source']} -> {p.get('new') or '?'}",
                p.get("verdict") or "–",
                fmt_pct(p.get("accuracy_old")),
                fmt_pct(p.get("accuracy_new")),
                fmt_pct(p.get("nfr")),
                str(p.get("gate", "")).upper(),
                f"yes ({p['alias']})" if p.get("alias_moved") else "no",
            )
        )
    print_table(("patch", "verdict", "acc old", "acc new", "NFR", "gate", "alias moved"), rows)
    for p in summary.get("patches", []):
        if not p.get("alias_moved") and p.get("reason"):
            console().print(f"[bold]{escape(p['patch'])}[/]: {escape(p['reason'])}")
    files = summary.get("summary_files") or {}
    if files:
        console().print(f"summary: {escape(files.get('html', ''))} (also .md, .json)")


@upgrade_app.command("run", hidden=True)
@handled
def upgrade_run(
    family: Annotated[str, typer.Argument(help="The base family whose patches follow the new release.")],
    to: Annotated[str, typer.Option("--to", help="The new release (a registered version of FAMILY).")],
    from_version: Annotated[
        str | None, typer.Option("--from", help="Only patches on this release (default: every older one).")
    ] = None,
    patches: Annotated[list[str] | None, typer.Option("--patches", help="Only these patch names (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (with verdicts); write nothing.")] = False,
    alias: Annotated[str | None, typer.Option(help="Alias to move on pass (default: the gate's, else latest).")] = None,
    jobs: Annotated[int, typer.Option(help="Patches upgraded at once.")] = 1,
    executor: Annotated[str, typer.Option(help="local (threads here) or ray (a Ray task per patch).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: start a local one).")] = None,
    vocab_policy: VocabPolicyOpt = None,
    push: Annotated[
        str | None, typer.Option("--push", help="Push each patch that passes its gate to ORG/NAME on the Hub.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for a run of the same upgrade instead of refusing.")
    ] = False,
    intruders: Annotated[
        bool,
        typer.Option(
            "--intruders", help="Add the intruder-dimension analysis to each diagnosis (two SVDs per matrix: slow)."
        ),
    ] = False,
    device: DeviceOpt = "auto",
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Upgrade every live patch of FAMILY to release --to: diagnose, port, register NAME@n+1, evaluate, flips,
    gate, move the alias on pass. Rerun the same command to resume an interrupted run."""
    from registry.workflows.executors import make_executor
    from registry.workflows.upgrade import plan_upgrade, run_upgrade

    quiet_transformers()
    names = [n for item in patches or [] for n in item.split(",") if n]
    with open_registry(registry) as reg:
        if dry_run:
            plan = plan_upgrade(
                reg,
                family,
                to,
                from_version=from_version,
                patches=names or None,
                vocab_policy=vocab_policy,
                verdicts=True,
                intruders=intruders,
                device=device,
            )
            if json_out:
                return print_json(plan.to_dict())
            return _print_plan(plan, alias)
        ex = make_executor(executor, address=ray_address)
        try:
            result = run_upgrade(
                reg,
                family,
                to,
                from_version=from_version,
                patches=names or None,
                alias=alias,
                vocab_policy=vocab_policy,
                push=push,
                jobs=jobs,
                executor=ex,
                device=device,
                wait=wait,
                intruders=intruders,
                log=_log(json_out),
            )
        finally:
            ex.close()
    if json_out:
        print_json(
            {"run": result.run.id, "resumed": result.resumed, "already_done": result.already_done, **result.summary}
        )
    else:
        if result.already_done:
            status(f"{family}@{to} was already upgraded by run {result.run.id}:")
        print_summary(result.summary)
    if not result.all_passed:
        raise typer.Exit(GATE_FAILED_EXIT)
    return None


def _print_plan(plan, alias: str | None) -> None:
    out = console()
    out.print(f"[bold]plan[/]: {len(plan.patches)} patch(es) of {escape(plan.family)} onto {escape(plan.to.ref)}")
    rows = [
        (
            f"{p.source} -> {p.name}@{int(p.source.rsplit('@', 1)[1]) + 1}",
            p.base,
            p.kind + (" (fused)" if p.fused else " (from patch)"),
            p.verdict or "–",
            ", ".join(s.rsplit("/", 1)[-1] for s in p.suite) or "NONE",
            "; ".join(p.gates),
            alias or p.alias,
        )
        for p in plan.patches
    ]
    print_table(("patch", "on", "port", "verdict", "suite", "gates", "alias"), rows)
    if plan.up_to_date:
        out.print(f"already on {escape(plan.to.ref)}: {escape(', '.join(plan.up_to_date))}")
    if plan.vocab_change:
        v = plan.vocab_change
        out.print(
            f"vocabulary: {v[0]} -> {v[1]} rows; policy: "
            + (escape(plan.vocab_policy) if plan.vocab_policy else "[bold red]NEEDED[/] (--vocab-policy)")
        )
    else:
        out.print("vocabulary: unchanged (no policy needed)")
    out.print(f"disk: about {fmt_size(plan.disk_needed)} needed, {fmt_size(plan.disk_free)} free")
    for p in plan.problems:
        out.print(f"[bold red]must fix first[/]: {escape(p)}")
    out.print("[dim]dry run: nothing written[/]")


@upgrade_app.command("status")
@handled
def upgrade_status(
    run: Annotated[int | None, typer.Argument(help="Run id (default: the newest).")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """One run: its state and every patch's steps (state, seconds, error)."""
    with open_registry(registry) as reg:
        info = reg.get_run(run)
    if json_out:
        return print_json(info.to_dict())
    out = console()
    out.print(
        f"run {info.id}: {escape(info.family)} -> {escape(info.to_version)} [bold]{info.state}[/]"
        + (f" at {escape(info.failed_step or '')}: {escape(info.error or '')}" if info.state == "failed" else "")
    )
    rows = [
        (s.source, s.step, s.state, "" if s.seconds is None else f"{s.seconds:.2f}", s.error or _brief(s.outcome))
        for s in info.steps
    ]
    print_table(("patch", "step", "state", "seconds", "outcome"), rows)
    if info.summary:
        out.print(f"summary: {escape((info.summary.get('summary_files') or {}).get('html', ''))}")
    return None


def _brief(outcome: Any) -> str:
    if not isinstance(outcome, dict):
        return ""
    for key in ("verdict", "ref", "derived", "passed", "reason", "moved"):
        if key in outcome:
            return f"{key}: {outcome[key]}"
    return ""


@upgrade_app.command("ls")
@handled
def upgrade_ls(
    family: Annotated[str | None, typer.Option(help="Only this family's runs.")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Upgrade runs, oldest first."""
    with open_registry(registry) as reg:
        runs = reg.list_runs(family)
    if json_out:
        return print_json([r.to_dict() for r in runs])
    rows = []
    for r in runs:
        s = r.summary or {}
        passed = f"{s.get('passed', '?')}/{len(s.get('patches', []))}" if s else ""
        rows.append((str(r.id), r.family, r.from_version or "*", r.to_version, r.state, passed, r.started_at))
    print_table(("run", "family", "from", "to", "state", "passed", "started"), rows)
    return None


@app.command()
@handled
def watch(
    family: Annotated[str, typer.Argument(help="The base family to keep up to date.")],
    directory: Annotated[
        str | None, typer.Option("--dir", help="A folder where new release directories appear (version = name).")
    ] = None,
    hub_repo: Annotated[
        str | None, typer.Option("--hub", help="A Hub repo (org/name) whose new commits or tags are releases.")
    ] = None,
    branch: Annotated[
        str | None, typer.Option("--branch", help="With --hub: a new commit on this branch is a release (main).")
    ] = None,
    tags: Annotated[
        str | None, typer.Option("--tags", help="With --hub: a new tag matching this glob is a release (v*).")
    ] = None,
    push: Annotated[
        str | None, typer.Option("--push", help="Push each patch that passes its gate to ORG/NAME on the Hub.")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Look once and exit (cron, systemd timers).")] = False,
    interval: Annotated[str, typer.Option(help="Time between looks without --once: 30s, 15m, 1h...")] = "1h",
    jobs: Annotated[int, typer.Option(help="Patches upgraded at once.")] = 1,
    vocab_policy: VocabPolicyOpt = None,
    device: DeviceOpt = "auto",
    registry: RegistryOpt = None,
) -> None:
    """Notice new releases of FAMILY, register each as the next base version and upgrade every patch to it.

    Exit status (with --once): 0 nothing new, 10 a new release and every gate passed, 11 a new release and some
    patch failed its gate, 1 an error (rerun: the upgrade resumes)."""
    import time
    from pathlib import Path

    from cli.common import CliInputError
    from registry.workflows.watch import parse_interval, watch_dir_once, watch_hub_once

    if (directory is None) == (hub_repo is None):
        raise CliInputError("say where releases appear: --dir PATH or --hub ORG/REPO [--branch B | --tags GLOB]")
    if (branch or tags) and hub_repo is None:
        raise CliInputError("--branch and --tags go with --hub")
    if branch and tags:
        raise CliInputError("watch a branch or tags, not both")
    quiet_transformers()
    wait_s = parse_interval(interval)
    kw = {"log": _log(False), "jobs": jobs, "vocab_policy": vocab_policy, "device": device, "push": push}
    where = directory or f"{hub_repo} ({'tags ' + tags if tags else 'branch ' + (branch or 'main')})"
    while True:
        with open_registry(registry) as reg:
            if hub_repo is not None:
                res = watch_hub_once(reg, family, hub_repo, branch=branch, tags=tags, **kw)
            else:
                res = watch_dir_once(reg, family, Path(directory), **kw)
        for u in res.upgrades:
            print_summary(u.summary)
        for n in res.notes:
            status(n)
        if not res.found:
            status(f"nothing new for {family} in {where}")
        if once:
            raise typer.Exit(res.exit_code)
        time.sleep(wait_s)
