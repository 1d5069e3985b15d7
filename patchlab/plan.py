"""Plans: what happens to every tensor, decided before a single tensor byte is read.

A plan is an immutable value. It is what ``--dry-run`` prints, what the compatibility report summarises,
and what the engine executes. Every problem (missing keys, shape changes, vocabulary mismatch, tied
weights) is found here; anything that cannot be done safely raises with the tensors it concerns and the
option that would allow it.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from patchlab.errors import IncompatiblePatchError, PlanError
from patchlab.io.checkpoint import Checkpoint, check_dtype
from patchlab.kernels.vocab import POLICIES, by_token, identity, same_ids
from patchlab.names import align_names, is_vocab_tensor

# Steps of an extract plan: diff | set | delete. Steps of an apply/port plan: copy | add | set | drop.
DEFAULT_MAX_SKIP = 0.01
@dataclass(frozen=True)
class Step:
    """One output tensor (or one manifest entry) and how it is made."""

    name: str
    action: str
    shape: tuple[int, ...]
    dtype: str
    sources: Mapping[str, str] = field(default_factory=dict)  # input role -> tensor name in that input
    alpha: float = 1.0
    rows: str | None = None  # vocabulary policy applied to this tensor
    note: str = ""
    file: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            "action": self.action,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "sources": dict(self.sources),
        }
        if self.action == "add":
            d["alpha"] = self.alpha
        for k in ("rows", "note", "file"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        return d


@dataclass(frozen=True)
class Plan:
    operation: str
    inputs: Mapping[str, str]
    steps: tuple[Step, ...]
    unused: tuple[tuple[str, str, int], ...] = ()  # (input tensor, reason, parameters) left out
    warnings: tuple[str, ...] = ()
    options: Mapping[str, object] = field(default_factory=dict)
    out_vocab_rows: int | None = None  # set when the output's vocabulary size differs from the target's
    row_maps: Mapping[tuple[str, str], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def summary(self) -> dict:
        by_action: Counter[str] = Counter()
        params: Counter[str] = Counter()
        for s in self.steps:
            by_action[s.action] += 1
            params[s.action] += s.numel
        return {
            "tensors": dict(by_action),
            "parameters": dict(params),
            "unused_tensors": len(self.unused),
            "unused_parameters": sum(u[2] for u in self.unused),
            "vocab_policies": sorted({s.rows for s in self.steps if s.rows}),
        }

    def to_json(self) -> dict:
        return {
            "operation": self.operation,
            "inputs": dict(self.inputs),
            "options": dict(self.options),
            "summary": self.summary(),
            "warnings": list(self.warnings),
            "out_vocab_rows": self.out_vocab_rows,
            "steps": [s.to_json() for s in self.steps],
            "unused": [{"name": n, "reason": r, "parameters": p} for n, r, p in self.unused],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def render(self, limit: int = 40) -> str:
        """A human-readable listing for ``--dry-run``."""
        lines = [f"{self.operation} plan: " + ", ".join(f"{k}={v}" for k, v in self.inputs.items())]
        s = self.summary()
        lines.append(
            "  " + ", ".join(f"{a}: {n} tensors / {s['parameters'][a]:,} params" for a, n in s["tensors"].items())
        )
        shown = [st for st in self.steps if st.action not in ("copy",)] or list(self.steps)
        for st in shown[:limit]:
            extra = f" α={st.alpha:g}" if st.action == "add" and st.alpha != 1 else ""
            extra += f" rows={st.rows}" if st.rows else ""
            extra += f"  # {st.note}" if st.note else ""
            lines.append(f"  {st.action:<6} {st.name} {list(st.shape)} {st.dtype}{extra}")
        if len(shown) > limit:
            lines.append(f"  ... {len(shown) - limit} more")
        for n, r, p in self.unused:
            lines.append(f"  unused {n} ({p:,} params): {r}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


class _Problems:
    """Collects every problem of a plan so the user sees all of them at once."""

    def __init__(self) -> None:
        self.incompatible: list[str] = []
        self.policy: list[str] = []

    def raise_any(self) -> None:
        def fmt(items: list[str]) -> str:
            head = "; ".join(items[:5])
            return head + (f"; and {len(items) - 5} more" if len(items) > 5 else "")

        if self.incompatible:
            raise IncompatiblePatchError(fmt(self.incompatible))
        if self.policy:
            raise PlanError(fmt(self.policy))


def _reconcile(
    name: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    vocab: bool,
    ids_moved: bool,
    policy: str | None,
    sides: tuple[str, str],
    probs: _Problems,
    mismatch_hint: str,
) -> str | None:
    """How one tensor present on both sides lines up: ``"plain"`` (same rows, same token ids), ``"rows"``
    (a vocabulary policy maps its rows), or None after recording why it cannot be done."""
    a, b = sides
    if a_shape == b_shape and not (vocab and ids_moved and policy in (None, "by-token")):
        return "plain"
    if not vocab or a_shape[1:] != b_shape[1:]:
        probs.incompatible.append(
            f"{name} has shape {list(a_shape)} in the {a} but {list(b_shape)} in the {b}; {mismatch_hint}"
        )
        return None
    if policy is None:
        if a_shape == b_shape:
            probs.policy.append(
                f"{name}: the {a} and {b} tokenizers give some tokens different ids; "
                "use --vocab-policy by-token (or pad-zero to align by id)"
            )
        else:
            probs.policy.append(
                f"{name}: vocabulary rows differ ({a} {a_shape[0]}, {b} {b_shape[0]}); choose --vocab-policy "
                "pad-zero|truncate|by-token|skip-embeddings"
            )
        return None
    return "rows"


def _check_policy(vocab_policy: str | None) -> None:
    if vocab_policy is not None and vocab_policy not in POLICIES:
        raise PlanError(f"unknown vocab policy {vocab_policy!r}; choose one of {', '.join(POLICIES)}")


# ---------------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------------
NATIVE_STORE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def native_store(dtype: torch.dtype) -> str:
    """The default storage dtype of a Δ: its fine-tune's own when a delta fits it, else fp32."""
    return _dt(dtype if dtype in NATIVE_STORE else torch.float32)


def plan_extract(
    base: Checkpoint,
    finetuned: Checkpoint,
    *,
    vocab_policy: str | None = None,
    storage_dtype: torch.dtype | None = None,
) -> Plan:
    """Plan ``Δ = ft − base`` for every tensor of the fine-tune.

    ``storage_dtype`` None stores each Δ in its fine-tune tensor's own dtype (fp32 for dtypes that cannot
    hold a difference); extract keeps it exact with residuals."""
    _check_policy(vocab_policy)
    probs = _Problems()
    steps: list[Step] = []
    unused: list[tuple[str, str, int]] = []
    warnings: list[str] = []
    maps: dict[tuple[str, str], torch.Tensor] = {}
    store = _dt(storage_dtype) if storage_dtype is not None else None
    ids_moved = not same_ids(finetuned.vocab, base.vocab)

    for name in finetuned.names:
        fi = finetuned.info(name)
        if finetuned.tied and name == finetuned.head_name and finetuned.embed_name:
            unused.append((name, "fine-tune ties lm_head to its embedding; the stored copy is redundant", fi.numel))
            continue
        if name not in base:
            steps.append(Step(name, "set", fi.shape, _dt(fi.dtype), {"finetuned": name}, note="only in fine-tune"))
            continue
        bi = base.info(name)
        if not (fi.dtype.is_floating_point and bi.dtype.is_floating_point):
            steps.append(Step(name, "set", fi.shape, _dt(fi.dtype), {"finetuned": name}, note="integer/bool: copied"))
            continue
        check_dtype(fi)
        check_dtype(bi)
        vocab = is_vocab_tensor(name)
        if vocab and vocab_policy == "skip-embeddings":
            unused.append((name, "vocab tensor skipped (--vocab-policy skip-embeddings)", fi.numel))
            continue
        how = _reconcile(
            name,
            bi.shape,
            fi.shape,
            vocab,
            ids_moved,
            vocab_policy,
            ("base", "fine-tune"),
            probs,
            "is this fine-tune really made from this base?",
        )
        if how == "plain":
            dt = store or native_store(fi.dtype)
            steps.append(Step(name, "diff", fi.shape, dt, {"finetuned": name, "base": name}))
        if how != "rows":
            continue
        rows = fi.shape[0]
        if vocab_policy == "pad-zero":
            maps[(name, "base")] = identity(rows, bi.shape[0])
        elif vocab_policy == "truncate":
            rows = min(fi.shape[0], bi.shape[0])
        elif vocab_policy == "by-token":
            if finetuned.vocab is None or base.vocab is None:
                probs.policy.append(f"{name}: by-token needs tokenizer.json in both base and fine-tune")
                continue
            m, matched, _ = by_token(finetuned.vocab, base.vocab, rows)
            maps[(name, "base")] = m
            warnings.append(f"{name}: {matched}/{rows} rows matched by token string")
        steps.append(
            Step(
                name,
                "diff",
                (rows, *fi.shape[1:]),
                store or native_store(fi.dtype),
                {"finetuned": name, "base": name},
                rows=vocab_policy,
            )
        )
    for name in base.names:
        if name not in finetuned and not (base.tied and name == base.head_name):
            bi = base.info(name)
            steps.append(Step(name, "delete", bi.shape, _dt(bi.dtype), note="only in base"))
    probs.raise_any()
    return Plan(
        "extract",
        {"base": str(base.path), "finetuned": str(finetuned.path)},
        tuple(steps),
        tuple(unused),
        tuple(warnings),
        {"vocab_policy": vocab_policy, "storage_dtype": store or "finetune"},
        row_maps=maps,
    )


# ---------------------------------------------------------------------------------------------------
# apply / port
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeltaEntry:
    op: str  # add | set | delete
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class DeltaView:
    """What planning needs to know of a delta source (a stored patch or a fused ft − base pair)."""

    label: str
    entries: Mapping[str, DeltaEntry]
    vocab: dict[str, int] | None
    tied: bool

    @property
    def embed_name(self) -> str | None:
        return next((n for n in self.entries if n.endswith(("embed_tokens.weight", "wte.weight"))), None)


def alpha_for(
    name: str, alpha: float, alpha_by_pattern: Sequence[tuple[str, float]] | Mapping[str, float] | None
) -> float:
    """The α of one tensor: the first matching glob pattern wins, else the global α."""
    items = alpha_by_pattern.items() if isinstance(alpha_by_pattern, Mapping) else (alpha_by_pattern or ())
    for pat, a in items:
        if fnmatch.fnmatchcase(name, pat):
            return float(a)
    return float(alpha)


def plan_apply(
    delta: DeltaView,
    target: Checkpoint,
    *,
    operation: str = "apply",
    alpha: float = 1.0,
    alpha_by_pattern: Sequence[tuple[str, float]] | Mapping[str, float] | None = None,
    vocab_policy: str | None = None,
    force: bool = False,
    max_skip: float = DEFAULT_MAX_SKIP,
) -> Plan:
    """Plan ``target + α·Δ`` tensor by tensor, in the target's order and shard layout."""
    _check_policy(vocab_policy)
    probs = _Problems()
    steps: list[Step] = []
    unused: list[tuple[str, str, int]] = []
    warnings: list[str] = []
    maps: dict[tuple[str, str], torch.Tensor] = {}
    out_vocab_rows: int | None = None
    rename, how = align_names(list(delta.entries), target)
    if how:
        warnings.append(f"patch tensor names matched the target after we {how}")
    by_target = {rename[n]: n for n in delta.entries}
    consumed: set[str] = set()
    ids_moved = not same_ids(delta.vocab, target.vocab)
    default_file = "model.safetensors"

    for name in target.names:
        ti = target.info(name)
        file = target.file_of(name) if target.sharded else default_file
        dname = by_target.get(name)
        if target.tied and name == target.head_name and target.embed_name:
            steps.append(
                Step(
                    name,
                    "drop",
                    ti.shape,
                    _dt(ti.dtype),
                    {"target": name},
                    note="target ties lm_head to its embedding: not written twice",
                )
            )
            if dname:
                consumed.add(dname)
                unused.append((dname, "target ties lm_head to its embedding", math.prod(delta.entries[dname].shape)))
            continue
        if dname is None and name == target.head_name and not target.tied and delta.tied and delta.embed_name:
            dname = delta.embed_name
            note = "fine-tune ties lm_head to its embedding: the embedding delta is applied to lm_head"
        else:
            note = ""
        if dname is None:
            steps.append(Step(name, "copy", ti.shape, _dt(ti.dtype), {"target": name}, file=file))
            continue
        consumed.add(dname)
        d = delta.entries[dname]
        if d.op == "delete":
            steps.append(Step(name, "drop", ti.shape, _dt(ti.dtype), {"target": name}, note="deleted by the patch"))
            continue
        if not ti.dtype.is_floating_point or d.op == "set":
            if d.op == "set" and d.shape == ti.shape:
                steps.append(Step(name, "set", ti.shape, d.dtype, {"delta": dname}, note=note, file=file))
            elif d.op == "set":
                probs.incompatible.append(f"{name}: patch sets shape {list(d.shape)}, target has {list(ti.shape)}")
            else:
                steps.append(
                    Step(
                        name, "copy", ti.shape, _dt(ti.dtype), {"target": name}, note="integer/bool: copied", file=file
                    )
                )
            continue
        check_dtype(ti)
        a = alpha_for(name, alpha, alpha_by_pattern)
        vocab = is_vocab_tensor(name)
        if vocab and vocab_policy == "skip-embeddings":
            steps.append(
                Step(
                    name,
                    "copy",
                    ti.shape,
                    _dt(ti.dtype),
                    {"target": name},
                    rows="skip-embeddings",
                    note="embeddings kept from the target",
                    file=file,
                )
            )
            unused.append((dname, "vocab tensor skipped (--vocab-policy skip-embeddings)", math.prod(d.shape)))
            continue
        how = _reconcile(
            name,
            d.shape,
            ti.shape,
            vocab,
            ids_moved,
            vocab_policy,
            ("patch", "target"),
            probs,
            "the patch was made for another architecture",
        )
        if how == "plain":
            steps.append(
                Step(name, "add", ti.shape, _dt(ti.dtype), {"target": name, "delta": dname}, a, note=note, file=file)
            )
        if how != "rows":
            continue
        rows = ti.shape[0]
        if vocab_policy == "pad-zero":
            rows = max(ti.shape[0], d.shape[0])
            if rows != ti.shape[0]:
                maps[(name, "target")] = identity(rows, ti.shape[0])
                out_vocab_rows = rows
            maps[(name, "delta")] = identity(rows, d.shape[0])
        elif vocab_policy == "truncate":
            maps[(name, "delta")] = identity(rows, d.shape[0])
        elif vocab_policy == "by-token":
            if delta.vocab is None or target.vocab is None:
                probs.policy.append(
                    f"{name}: by-token needs tokenizer.json for both the patch's fine-tune and the target"
                )
                continue
            m, matched, lost = by_token(target.vocab, delta.vocab, rows)
            maps[(name, "delta")] = m
            warnings.append(
                f"{name}: {matched}/{rows} target rows matched by token string; {lost} source tokens have no place"
            )
        steps.append(
            Step(
                name,
                "add",
                (rows, *ti.shape[1:]),
                _dt(ti.dtype),
                {"target": name, "delta": dname},
                a,
                rows=vocab_policy,
                note=note,
                file=file,
            )
        )

    last_file = steps[-1].file if steps and steps[-1].file else default_file
    for dname, d in delta.entries.items():
        if dname in consumed:
            continue
        tname = rename[dname]
        n = math.prod(d.shape)
        if d.op == "delete":
            continue
        if target.tied and dname.endswith("lm_head.weight"):
            unused.append(
                (dname, "target ties lm_head to its embedding; a separate lm_head delta cannot be applied", n)
            )
        elif d.op == "set" and operation == "apply":
            steps.append(Step(tname, "set", d.shape, d.dtype, {"delta": dname}, note="new tensor", file=last_file))
        else:
            unused.append((dname, "not in target", n))
    probs.raise_any()

    total = sum(math.prod(d.shape) for d in delta.entries.values() if d.op != "delete") or 1
    skipped = sum(u[2] for u in unused if "skip-embeddings" not in u[1])
    applied = sum(1 for s in steps if s.action in ("add", "set"))
    if applied == 0 and any(d.op == "add" for d in delta.entries.values()):
        raise IncompatiblePatchError(
            f"none of the patch's {len(delta.entries)} tensors exist in {target.path}: "
            "the patch was made for another architecture"
        )
    if skipped / total > max_skip and not force:
        names = ", ".join(u[0] for u in sorted(unused, key=lambda u: -u[2])[:4])
        raise PlanError(
            f"{operation} would skip {skipped / total:.1%} of the patch's parameters ({names}); "
            f"pass --force to accept, or fix the mismatch"
        )
    if unused:
        warnings.append(f"{len(unused)} patch tensors not applied ({skipped:,} parameters)")
    return Plan(
        operation,
        {"delta": delta.label, "target": str(target.path)},
        tuple(steps),
        tuple(unused),
        tuple(warnings),
        {
            "alpha": alpha,
            "alpha_by_pattern": dict(alpha_by_pattern or {}),
            "vocab_policy": vocab_policy,
            "force": force,
        },
        out_vocab_rows,
        maps,
    )


# ---------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------
def source_role(i: int) -> str:
    """The ``Step.sources`` role (and row-map key) of the ``i``-th patch of a merge."""
    return f"p{i}"


def plan_merge(
    deltas: Sequence[DeltaView],
    target: Checkpoint,
    *,
    operation: str = "merge",
    model: bool = False,
    vocab_policy: str | None = None,
    force: bool = False,
    max_skip: float = DEFAULT_MAX_SKIP,
    options: Mapping[str, object] | None = None,
) -> Plan:
    """Plan a merge of several deltas, expressed on ``target``'s tensors (the patches' base, or the base
    they are ported to): each delta is planned as a port onto ``target`` (``plan_apply``: vocabulary rows,
    tied embeddings, missing tensors), then the per-patch plans are joined tensor by tensor.

    Steps: ``merge`` (the patches whose plan adds to the tensor, one role ``p<i>`` each; the others contribute
    zero), ``set``, ``delete`` (patch output) or ``drop`` (model output), and ``copy`` (``model``: target
    tensors no patch touches; they are left out of a patch). Row maps are keyed ``(name, "p<i>")``.
    """
    port_op = "apply" if operation == "merge" else "port"
    plans = [
        plan_apply(d, target, operation=port_op, vocab_policy=vocab_policy, force=force, max_skip=max_skip)
        for d in deltas
    ]
    probs = _Problems()
    by_name: dict[str, list[tuple[int, Step]]] = {}
    order: list[str] = []
    for i, p in enumerate(plans):
        for s in p.steps:
            if s.name not in by_name:
                by_name[s.name] = []
                order.append(s.name)
            by_name[s.name].append((i, s))
    steps: list[Step] = []
    maps: dict[tuple[str, str], torch.Tensor] = {}
    warnings: list[str] = []
    for name in order:
        per = by_name[name]
        adds = [(i, s) for i, s in per if s.action == "add"]
        sets = [(i, s) for i, s in per if s.action == "set"]
        deletes = [(i, s) for i, s in per if s.action == "drop" and s.note == "deleted by the patch"]
        first = per[0][1]
        if adds and (sets or deletes):
            other = (sets or deletes)[0]
            what = "sets" if sets else "deletes"
            probs.incompatible.append(f"{name}: patch {adds[0][0] + 1} adds a delta but patch {other[0] + 1} {what} it")
            continue
        if adds:
            shapes = {s.shape for _, s in adds}
            if len(shapes) > 1:
                probs.policy.append(
                    f"{name}: the patches' rows do not line up ({', '.join(str(list(x)) for x in shapes)}); "
                    "choose --vocab-policy truncate or by-token"
                )
                continue
            s0 = adds[0][1]
            for i, _ in adds:
                m = plans[i].row_maps.get((name, "delta"))
                if m is not None:
                    maps[(name, source_role(i))] = m
                t = plans[i].row_maps.get((name, "target"))
                if t is not None:
                    maps[(name, "target")] = t
            notes = sorted({f"patch {i + 1}: {s.note}" for i, s in adds if s.note})
            steps.append(
                Step(
                    name,
                    "merge",
                    s0.shape,
                    s0.dtype,
                    {source_role(i): s.sources["delta"] for i, s in adds},
                    rows=next((s.rows for _, s in adds if s.rows), None),
                    note="; ".join(notes),
                    file=s0.file,
                )
            )
        elif sets:
            i, s = sets[0]
            if len(sets) > 1:
                warnings.append(
                    f"{name}: set by patches {', '.join(str(j + 1) for j, _ in sets)}; patch {i + 1}'s value kept"
                )
            steps.append(
                Step(name, "set", s.shape, s.dtype, {source_role(i): s.sources["delta"]}, note=s.note, file=s.file)
            )
        elif deletes:
            action = "drop" if model else "delete"
            steps.append(Step(name, action, first.shape, first.dtype, note="deleted by a patch"))
        elif first.action == "drop":
            steps.append(Step(name, "drop", first.shape, first.dtype, dict(first.sources), note=first.note))
        elif model:
            steps.append(first)
    unused: list[tuple[str, str, int]] = []
    for i, p in enumerate(plans):
        unused += [(n, f"patch {i + 1}: {r}", k) for n, r, k in p.unused]
        warnings += [f"patch {i + 1}: {w}" for w in p.warnings]
    rows = {p.out_vocab_rows for p in plans if p.out_vocab_rows}
    if len(rows) > 1:
        probs.policy.append(f"the patches would grow the vocabulary to different sizes {sorted(rows)}; use truncate")
    probs.raise_any()
    if not any(s.action == "merge" for s in steps):
        raise IncompatiblePatchError("the patches have no delta tensor in common with the base; nothing to merge")
    inputs = {source_role(i): d.label for i, d in enumerate(deltas)}
    inputs["target"] = str(target.path)
    return Plan(
        operation,
        inputs,
        tuple(steps),
        tuple(unused),
        tuple(warnings),
        {"vocab_policy": vocab_policy, "force": force, **(options or {})},
        rows.pop() if rows else None,
        maps,
    )
