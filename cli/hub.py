"""``push``, ``pull``: patches, PEFT adapters and derived models to and from the Hugging Face Hub (thin shells
over ``registry.workflows.publish``)."""

# No "from __future__ import annotations": typer evaluates the option annotations.

from pathlib import Path
from typing import Annotated

import typer

from cli.common import JsonOpt, RegistryOpt, escape, handled, open_registry, print_json, status

app = typer.Typer()


@app.command()
@handled
def push(
    ref: Annotated[str, typer.Argument(help="A registered patch (name[@n]) or derived model (derived:N).")],
    repo_id: Annotated[str, typer.Argument(help="The Hub repo to push to, org/name (created if missing).")],
    as_: Annotated[
        str | None,
        typer.Option(
            "--as", help="patch (the stored patch directory), peft (a LoRA adapter) or model (a derived model)."
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Branch to push to (default: main; created if missing).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Push even if the branch moved since the last push recorded here.")
    ] = False,
    report: Annotated[
        Path | None, typer.Option(help="A `patchlab report` directory (or report.json): its verdict goes on the card.")
    ] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Push a patch, a PEFT adapter or a derived model to the Hub as one commit, with a model card.

    Pushing what the repo already holds makes no commit. Tokens come from huggingface_hub's usual places
    (HF_TOKEN, `hf auth login`).
    """
    from registry.workflows import publish

    with open_registry(registry) as reg:
        out = publish.push(
            reg, ref, repo_id, as_=as_, revision=revision, private=private, create_pr=create_pr, force=force,
            report=report,
        )  # fmt: skip
    r = out.result
    if json_out:
        return print_json(
            {
                "repo_id": r.repo_id,
                "revision": r.revision,
                "commit_sha": r.commit_sha,
                "created_commit": r.created_commit,
                "kind": out.kind,
                "source": out.source,
                "commit_url": r.commit_url,
                "pr_url": r.pr_url,
                "files": list(r.changed_files),
                "deleted": list(r.deleted_files),
            }
        )
    where = f"{escape(r.repo_id)}@{escape(r.revision)}"
    if not r.created_commit:
        status(f"{where} already up to date: no commit ({escape(r.commit_sha[:12])})")
    else:
        status(
            f"pushed {escape(out.source)} as {out.kind} to {where}: commit {escape(r.commit_sha[:12])}, "
            f"{len(r.changed_files)} files changed, {len(r.deleted_files)} deleted"
            + (f"; pull request {escape(r.pr_url)}" if r.pr_url else "")
        )
    return None


@app.command()
@handled
def pull(
    spec: Annotated[str, typer.Argument(help="org/name[@revision]: a pushed patch or a PEFT adapter.")],
    name: Annotated[str | None, typer.Option(help="Register as this name (default: the pushed patch's name).")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a pushed patch (or a PEFT adapter, imported as a low-rank patch) and register it on its base."""
    from registry.workflows import publish

    with open_registry(registry) as reg:
        out = publish.pull(reg, spec, name=name)
    if json_out:
        return print_json(
            {"repo_id": out.repo_id, "commit_sha": out.commit_sha, "kind": out.kind, "patch": out.patch.to_dict()}
        )
    status(
        f"pulled {escape(out.repo_id)}@{escape(out.commit_sha[:12])} ({out.kind}); registered "
        f"[bold]{escape(out.patch.ref)}[/] on {escape(out.patch.base or '?')}"
    )
    return None
