"""``merge``: several patches into one (task arithmetic, TIES, DARE, DELLA, breadcrumbs), from options or a
mergekit-style YAML file, registered with every input as a parent (relation ``merge``)."""

# No "from __future__ import annotations": typer evaluates the option annotations.

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import (
    CliInputError,
    DeviceOpt,
    EnergyOpt,
    JsonOpt,
    NoRegisterOpt,
    OverwriteOpt,
    RankOpt,
    RegistryOpt,
    VocabPolicyOpt,
    escape,
    handled,
    is_ref,
    open_registry,
    print_json,
    registered,
    status,
    will_register,
)

app = typer.Typer()

CONFIG_KEYS = ("merge_method", "models", "parameters", "base_model", "seed")
MODEL_KEYS = ("model", "parameters")
PER_PATCH = ("weight", "density", "gamma", "epsilon")


def _numbers(option: str, text: str | None) -> list[float] | float | None:
    """``"1,0.5"`` → [1.0, 0.5]; one number stays one number (it applies to every patch)."""
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise CliInputError(f"cannot read {option} {text!r}; write numbers separated by commas, e.g. 1,0.5") from None
    return values[0] if len(values) == 1 else values


def _closest(word: str, choices: tuple[str, ...]) -> str:
    import difflib

    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid: {', '.join(choices)}"


def read_config(path: Path) -> tuple[list[str], dict[str, Any], str | None, int | None]:
    """A mergekit-style YAML file → (patch references, ``patchlab.merge`` keyword arguments, base, seed).

    ``merge_method``; ``models: [{model: REF, parameters: {weight, density, gamma, epsilon}}]``;
    ``parameters: {lambda, normalize, rescale, sign_election}``, where a per-patch parameter is the default
    of every model that does not set it (as in mergekit); optional ``base_model`` and ``seed``.
    """
    import yaml

    from patchlab.kernels.merge import validate_merge_config

    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CliInputError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise CliInputError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise CliInputError(f"{path}: expected a mapping with merge_method and models")
    for key in doc:
        if key not in CONFIG_KEYS:
            raise CliInputError(f"{path}: unknown key {key!r}{_closest(str(key), CONFIG_KEYS)}")
    method = doc.get("merge_method")
    if not isinstance(method, str):
        raise CliInputError(f"{path}: merge_method is missing (e.g. merge_method: ties)")
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise CliInputError(f"{path}: models must be a list of {{model: PATCH, parameters: {{...}}}}")
    glob = dict(doc.get("parameters") or {})
    defaults = {k: glob.pop(k) for k in PER_PATCH if k in glob}
    refs: list[str] = []
    per: list[dict[str, Any]] = []
    for i, m in enumerate(models, start=1):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or not isinstance(m.get("model"), str):
            raise CliInputError(f"{path}: models[{i}] needs a `model:` naming a patch")
        for key in m:
            if key not in MODEL_KEYS:
                raise CliInputError(f"{path}: models[{i}]: unknown key {key!r}{_closest(str(key), MODEL_KEYS)}")
        refs.append(m["model"])
        p = m.get("parameters") or {}
        if not isinstance(p, dict):
            raise CliInputError(f"{path}: models[{i}].parameters must be a mapping")
        per.append({**{k: v for k, v in defaults.items()}, **p})
    params = validate_merge_config(method, per, glob)
    mp = params.method.patch_params
    kwargs: dict[str, Any] = {
        "method": params.method.name,
        "weights": list(params.weights),
        "lambda_": params.lambda_,
        "normalize": params.normalize,
        "rescale": params.rescale or "none",
        "sign_election": params.sign_election or "none",
    }
    for key, plural in (("density", "densities"), ("gamma", "gammas"), ("epsilon", "epsilons")):
        if key in mp:
            kwargs[plural] = list(getattr(params, plural))
    seed = doc.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise CliInputError(f"{path}: seed must be an integer, got {seed!r}")
    base = doc.get("base_model")
    return refs, kwargs, (str(base) if base is not None else None), seed


@app.command()
@handled
def merge(
    patches: Annotated[
        list[str] | None, typer.Argument(help="Patches to merge: directories or registered references.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory to write (a patch, or a model).")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="mergekit-style YAML: merge_method, models, parameters.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="task_arithmetic (default), ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, "
            "della_linear."
        ),
    ] = None,
    weights: Annotated[str | None, typer.Option(help="Weight per patch, e.g. 1,0.5 (one number: all).")] = None,
    density: Annotated[str | None, typer.Option(help="Share of entries kept, per patch or one for all.")] = None,
    gamma: Annotated[str | None, typer.Option(help="breadcrumbs: share of outliers dropped.")] = None,
    epsilon: Annotated[str | None, typer.Option(help="DELLA: spread of the keep probabilities.")] = None,
    lambda_: Annotated[float | None, typer.Option("--lambda", help="Scale of the merged delta.")] = None,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="Divide by the agreeing weights.")
    ] = None,
    rescale: Annotated[str | None, typer.Option(help="l1, inverse-density or none.")] = None,
    sign_election: Annotated[str | None, typer.Option(help="sum, count or none.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random methods (DARE, DELLA).")] = None,
    onto: Annotated[str | None, typer.Option(help="Write the full model BASE + merged delta instead.")] = None,
    port_to: Annotated[
        str | None, typer.Option(help="Merge patches made on other bases, ported onto this one in the same pass.")
    ] = None,
    base: Annotated[str | None, typer.Option(help="The base the patches were made on (default: recorded).")] = None,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    vocab_policy: VocabPolicyOpt = None,
    force: Annotated[bool, typer.Option(help="Merge even when a patch's plan skips part of it.")] = False,
    name: Annotated[str | None, typer.Option(help="Register as this name (default: the output dir name).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    no_register: NoRegisterOpt = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Merge patches into one patch (or, with --onto, one model), registered with every input as a parent."""
    import patchlab

    refs_, kwargs = _request(
        patches, config, method, weights, density, gamma, epsilon, lambda_, normalize, rescale, sign_election
    )
    if config is not None:
        _, _, cfg_base, cfg_seed = read_config(config)
        base = base or cfg_base
        seed = seed if seed is not None else cfg_seed
    if out is None and not dry_run:
        raise CliInputError("give the output directory with -o OUT")
    register = not (no_register or dry_run or onto is not None)
    if register and name is not None:
        from registry.refs import validate_name

        validate_name(name)
    needs_reg = register or any(is_ref(x) for x in [*refs_, base, onto, port_to] if x is not None)
    reg = open_registry(registry) if needs_reg else None
    try:
        dirs: list[Path] = []
        parents: list[str] = []
        bases: list[str | None] = []
        for r in refs_:
            if reg is not None and is_ref(r):
                info = reg.get_patch(r)
                dirs.append(reg.resolve_patch_path(r))
                parents.append(info.ref)
                bases.append(info.base)
            else:
                dirs.append(Path(r))
                info = reg.find_patch_dir(r) if register and reg is not None else None
                if info is not None:
                    parents.append(info.ref)
                bases.append(info.base if info is not None else None)
        ck = (lambda x: reg.checkpoint_path(x)) if reg is not None else (lambda x: x)  # noqa: E731
        if register and reg is not None and not dry_run:
            will_register(reg)  # a rerun after a kill between the output and its row finishes the job
        result = patchlab.merge(
            dirs,
            out or Path("."),
            **kwargs,
            seed=seed or 0,
            onto=ck(onto) if onto else None,
            port_to=ck(port_to) if port_to else None,
            base=ck(base) if base else None,
            rank=rank,
            energy=energy,
            vocab_policy=vocab_policy,
            force=force,
            device=device,
            overwrite=overwrite,
            dry_run=dry_run,
        )
        if dry_run:
            return print_json(result.to_json()) if json_out else typer.echo(result.render())
        info = None
        if register:
            reg_base = port_to if port_to and is_ref(port_to) else (bases[0] if len(set(bases)) == 1 else None)
            if base and is_ref(base) and not port_to:
                reg_base = base
            try:
                info = reg.add_patch(
                    result.path, name=name, base=reg_base, parents=parents, relation="merge", require_base=False
                )
                registered(result.path, info.ref)
            except BaseException:
                shutil.rmtree(result.path, ignore_errors=True)  # nothing written when it cannot be recorded
                raise
    finally:
        if reg is not None:
            reg.close()
    totals = result.manifest.get("totals", {}) if onto is None else {}
    if json_out:
        return print_json(
            {"path": str(result.path), "patch": info.to_dict() if info else None, "energy": totals.get("energy")}
        )
    msg = f"wrote {escape(str(result.path))}"
    if rank is not None or energy is not None:
        msg += f" (energy kept {totals.get('energy', 0):.4f})"
    if info:
        msg += f"; registered [bold]{escape(info.ref)}[/], merge of {escape(', '.join(parents) or '?')}"
    status(msg)
    return None


def _request(
    patches: list[str] | None,
    config: Path | None,
    method: str | None,
    weights: str | None,
    density: str | None,
    gamma: str | None,
    epsilon: str | None,
    lambda_: float | None,
    normalize: bool | None,
    rescale: str | None,
    sign_election: str | None,
) -> tuple[list[str], dict[str, Any]]:
    """The patch references and the method's keyword arguments, from the options or from --config."""
    flags = {
        "--method": method,
        "--weights": weights,
        "--density": density,
        "--gamma": gamma,
        "--epsilon": epsilon,
        "--lambda": lambda_,
        "--normalize": normalize,
        "--rescale": rescale,
        "--sign-election": sign_election,
    }
    if config is not None:
        if patches:
            raise CliInputError("give the patches in --config or on the command line, not both")
        given = [k for k, v in flags.items() if v is not None]
        if given:
            raise CliInputError(f"{given[0]} cannot be combined with --config; set it in the file")
        refs_, kwargs, _, _ = read_config(config)
        return refs_, kwargs
    if not patches:
        raise CliInputError("give the patches to merge (PATCH...) or a --config file")
    kwargs: dict[str, Any] = {"method": method or "task_arithmetic"}
    for key, opt, text in (
        ("weights", "--weights", weights),
        ("densities", "--density", density),
        ("gammas", "--gamma", gamma),
        ("epsilons", "--epsilon", epsilon),
    ):
        v = _numbers(opt, text)
        if v is not None:
            kwargs[key] = v
    for key, v in (
        ("lambda_", lambda_),
        ("normalize", normalize),
        ("rescale", rescale),
        ("sign_election", sign_election),
    ):
        if v is not None:
            kwargs[key] = v
    return list(patches), kwargs
