"""``patchlab upgrade``: when a family gets a new base release, every live patch follows it, gated.

For every live patch of the family (the newest version of each name whose base is an older release):

    diagnose (verdict) -> port (fused when the fine-tune is at hand, else from the stored patch)
    -> register NAME@n+1 on the new base with lineage (relation "port") -> evaluate its suite
    -> baseline (the previous version's stored results; evaluated and stored when it has none)
    -> flips (negative flips old -> new) -> gate -> alias (moved only on pass) -> report

The run is durable: the run and every (patch, step) are rows in the registry. A step is marked ``running``
before it starts and ``done`` only once what it made exists (files renamed into place, rows written); every
step is idempotent on rerun (outputs are reused when whole, rows are matched rather than duplicated), so the
same command after a ``kill -9`` continues where it stopped. A lease row keeps two runs of one family and
version apart. Only this driver writes to the registry; ports and evaluations may run elsewhere
(``--executor ray``, see ``registry.workflows.executors``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from patchlab.errors import PatchlabError
from registry.api import Registry
from registry.errors import RegistryError, UnknownReferenceError
from registry.records import BaseInfo, PatchInfo, timestamp
from registry.rows import utcnow
from registry.topic import json_safe
from registry.upgrades import LEASE_SECONDS, VOCAB_POLICIES, LeaseHeldError, RunInfo, StepEnd, StepInfo
from registry.workflows.upgrade_tasks import clean_partials, complete_model, write_atomic

STEPS = ("diagnose", "port", "register", "evaluate", "baseline", "flips", "gate", "alias", "report")
#: an edit patch's extra step: its edit set re-evaluated (WILD) on the new base, after its suite
EDIT_STEP = "edits"
SUMMARY_FORMATS = ("md", "json", "html")
#: how a patch is brought onto the new base, by the method its manifest records; anything else is ported
MERGE_METHODS = ("merge",)
EDIT_METHODS = ("locft-bf", "edit")


class UpgradeError(RegistryError):
    """An upgrade cannot start, or a step of it failed (the message says which; rerun to resume)."""


def steps_for(kind: str) -> tuple[str, ...]:
    """The steps of one patch: every kind has :data:`STEPS`; an edit patch re-evaluates its edit set too."""
    if kind == "edit":
        i = STEPS.index("evaluate") + 1
        return (*STEPS[:i], EDIT_STEP, *STEPS[i:])
    return STEPS


Log = Callable[[str], None]


# ---- the plan -------------------------------------------------------------------------------------------


@dataclass
class PatchPlan:
    name: str
    source: str  # name@n
    base: str  # family@version it is on
    method: str | None
    finetuned: str | None  # the fine-tune directory, when it still exists (fused port)
    suite: tuple[str, ...]
    gates: tuple[str, ...]
    alias: str
    size: int
    verdict: str | None = None
    reasons: list[str] = field(default_factory=list)
    kind: str = "port"  # port | merge | edit
    parents: list[str] = field(default_factory=list)  # merge: the parent names (recipe order)
    recipe: dict[str, Any] = field(default_factory=dict)  # merge: the recorded merge() arguments
    edits: dict[str, Any] = field(default_factory=dict)  # edit: the recorded edit set (file, sha256)
    carry: bool = False  # NAME@n+1 is NAME@n's Δ on the new base (no vocabulary change): ported from the patch

    @property
    def fused(self) -> bool:
        return self.finetuned is not None and not self.carry and self.kind != "merge"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["fused"] = self.fused
        return d


@dataclass
class UpgradePlan:
    family: str
    to: BaseInfo
    from_version: str | None
    patches: list[PatchPlan]
    vocab_change: tuple[int | None, int | None] | None
    vocab_policy: str | None
    disk_needed: int
    disk_free: int
    problems: list[str]
    up_to_date: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "to": self.to.ref,
            "from": self.from_version,
            "patches": [p.to_dict() for p in self.patches],
            "up_to_date": self.up_to_date,
            "vocabulary": {
                "change": list(self.vocab_change) if self.vocab_change else None,
                "policy": self.vocab_policy,
                "policy_needed": bool(self.vocab_change) and self.vocab_policy is None,
            },
            "disk": {"needed": self.disk_needed, "free": self.disk_free},
            "problems": self.problems,
        }


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def plan_upgrade(
    reg: Registry,
    family: str,
    to: str,
    *,
    from_version: str | None = None,
    patches: Sequence[str] | None = None,
    vocab_policy: str | None = None,
    verdicts: bool = False,
    intruders: bool = False,
    device: str = "auto",
) -> UpgradePlan:
    """What an upgrade would do. Refuses what can never run (unknown family or version, a target not newer,
    no patches, a named patch outside the family); collects what the user must settle first (a vocabulary
    policy, a suite) in ``problems``. ``verdicts`` runs the weight-space diagnosis of each patch (read-only)."""
    target = reg.get_base(f"{family}@{to}")
    if target.family != family:
        raise UpgradeError(f"{family}@{to} is not a version of family {family}")
    bases = {b.ref: b for b in reg.list_bases(family)}
    if from_version is not None:
        src = reg.get_base(f"{family}@{from_version}")
        if src.release_order >= target.release_order:
            raise UpgradeError(
                f"{target.ref} is not newer than {src.ref} (release order {target.release_order} vs "
                f"{src.release_order}); upgrade to a later release"
            )
    live = reg.list_patches(all_versions=False)
    if patches:
        by_name = {p.name: p for p in live}
        chosen = []
        for n in patches:
            if n not in by_name:
                raise UnknownReferenceError(f"no patch named {n!r} in the registry (list them with `patchlab ls`)")
            p = by_name[n]
            if p.base is None or p.base not in bases:
                raise UpgradeError(
                    f"patch {p.ref} is on base {p.base or 'unknown'}, not a release of family {family}; "
                    "upgrade it with its own family"
                )
            chosen.append(p)
        live = chosen
    else:
        live = [p for p in live if p.base in bases]
    todo: list[PatchInfo] = []
    up_to_date: list[str] = []
    for p in live:
        order = bases[p.base].release_order  # type: ignore[index]
        if from_version is not None and p.base != f"{family}@{from_version}":
            if patches:
                raise UpgradeError(f"patch {p.ref} is on {p.base}, not on {family}@{from_version} (--from)")
            continue
        if order < target.release_order:
            todo.append(p)
        elif patches and order >= target.release_order:
            up_to_date.append(p.ref)
        elif order == target.release_order:
            up_to_date.append(p.ref)
    if not todo:
        newest = max(b.release_order for b in bases.values())
        if live and (target.release_order < newest or not up_to_date):
            on = ", ".join(f"{p.ref} on {p.base}" for p in live[:5])
            raise UpgradeError(
                f"{target.ref} is not newer than the releases the family's patches are on ({on}); "
                "upgrade to a later release"
            )
        if up_to_date:
            raise UpgradeError(f"nothing to upgrade: {', '.join(up_to_date[:5])} already on {target.ref}")
        raise UpgradeError(
            f"family {family} has no patches on a release older than {to}; nothing to upgrade "
            "(register some with `patchlab diff` or `patchlab add`)"
        )
    problems: list[str] = []
    policy = vocab_policy or reg.family_vocab_policy(family)
    if policy is not None and policy not in VOCAB_POLICIES:
        raise UpgradeError(f"vocabulary policy {policy!r} is not one of {', '.join(VOCAB_POLICIES)}")
    vocab_change = None
    for p in todo:
        old = bases[p.base].vocab_size  # type: ignore[index]
        if old != target.vocab_size:
            vocab_change = (old, target.vocab_size)
    if vocab_change and policy is None:
        problems.append(
            f"the vocabulary changes between releases ({vocab_change[0]} -> {vocab_change[1]} rows): pass "
            f"--vocab-policy ({', '.join(VOCAB_POLICIES)}) or set the family's with `patchlab gate set {family} "
            "--family --vocab-policy P`"
        )
    target_size = _dir_size(reg.checkpoint_path(target.ref)) if target.source_kind == "local" else 0
    plans: list[PatchPlan] = []
    need = 0
    for p in todo:
        g = reg.effective_gate(p.name, family)
        ft = p.finetuned if p.finetuned and Path(p.finetuned).is_dir() else None
        method = (p.method or "").lower()
        made = p.parameters if isinstance(p.parameters, dict) else {}
        if method == "port" and made.get("source_method"):  # carried by an earlier upgrade: what first made it
            method, made = str(made["source_method"]).lower(), made.get("source_parameters") or {}
        kind = "merge" if method in MERGE_METHODS else "edit" if method in EDIT_METHODS else "port"
        pp = PatchPlan(p.name, p.ref, p.base or "", p.method, ft, g.suite, g.expressions, g.alias, p.size, kind=kind)
        pp.carry = kind != "merge" and not vocab_change
        if not g.suite:
            problems.append(
                f"patch {p.name} has no evaluation suite: set one with `patchlab gate set {p.name} --suite FILE` "
                f"(or `--family {family}`)"
            )
        if kind == "merge":
            problems += _plan_merge(reg, pp, p, {q.name for q in todo}, target.ref)
        elif kind == "edit":
            pp.edits = {"file": made.get("edits_file"), "sha256": made.get("edits_sha256")}
        need += target_size + (0 if pp.carry else p.size) + (0 if ft else target_size)
        plans.append(pp)
    plans.sort(key=lambda q: q.kind == "merge")  # merged patches after their parents (stable otherwise)
    if verdicts:
        from patchlab.measure.diagnose import diagnose

        for pp in plans:
            try:
                d = diagnose(
                    reg.patch_path(pp.source),
                    reg.checkpoint_path(target.ref),
                    source_base=reg.checkpoint_path(pp.base),
                    intruders=intruders,
                    device=device,
                    base_pair=reg.base_drift(pp.base, target.ref),  # recorded: the source base is not read
                )
                pp.verdict, pp.reasons = d.verdict.level, list(d.verdict.reasons)
            except PatchlabError as exc:
                pp.verdict, pp.reasons = "unknown", [str(exc)]
    free = shutil.disk_usage(reg.home if reg.home.exists() else Path.cwd()).free
    if need > free:
        problems.append(f"the upgrade needs about {need / 1e9:.2f} GB but {reg.home} has {free / 1e9:.2f} GB free")
    return UpgradePlan(family, target, from_version, plans, vocab_change, policy, need, free, problems, up_to_date)


def _plan_merge(reg: Registry, pp: PatchPlan, info: PatchInfo, names: set[str], to_ref: str) -> list[str]:
    """Fill a merged patch's parents and recipe; what stops it from being rebuilt, as problems."""
    from registry.workflows.upgrade_tasks import merge_recipe

    parents = [ref.rsplit("@", 1)[0] for ref, rel in info.parents if rel == "merge"]
    if not parents:
        return [
            f"merged patch {pp.source} has no registered parents (relation merge): it cannot be rebuilt from "
            "upgraded ones; leave it out with --patches"
        ]
    pp.parents = parents
    pp.recipe = merge_recipe(info.parameters if isinstance(info.parameters, dict) else {})
    problems = []
    for n in parents:
        if n not in names and _version_on(reg, n, to_ref) is None:
            problems.append(
                f"merged patch {pp.source} needs its parent {n} on {to_ref}: upgrade it in the same run "
                f"(--patches {n} {pp.name}) or first"
            )
    return problems


def _version_on(reg: Registry, name: str, base_ref: str) -> str | None:
    """The newest version of patch ``name`` on base ``base_ref``."""
    have = [p for p in reg.list_patches(all_versions=True) if p.name == name and p.base == base_ref]
    return max(have, key=lambda p: p.version).ref if have else None


# ---- running it -----------------------------------------------------------------------------------------


@dataclass
class UpgradeResult:
    run: RunInfo
    summary: dict[str, Any]
    resumed: bool
    already_done: bool = False

    @property
    def all_passed(self) -> bool:
        return all(p.get("gate") == "pass" for p in self.summary.get("patches", []))


class _Lease:
    """The run's lease, renewed in the background while the run goes on."""

    def __init__(self, reg: Registry, key: str, *, wait: bool, log: Log, seconds: float = LEASE_SECONDS) -> None:
        self.reg, self.key, self.seconds = reg, key, seconds
        while True:
            try:
                self.token = reg.acquire_lease(key, seconds=seconds)
                break
            except LeaseHeldError as exc:
                if not wait:
                    raise
                log(f"waiting: {exc}")
                time.sleep(1.0)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="upgrade-lease", daemon=True)
        self._thread.start()

    def attach(self, run_id: int) -> None:
        self.reg.renew_lease(self.key, self.token, run_id=run_id, seconds=self.seconds)

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                if not self.reg.renew_lease(self.key, self.token, seconds=self.seconds):
                    self.lost = True
                    return
            except Exception:  # the database is away: the steps will say so
                pass

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.reg.release_lease(self.key, self.token)
        except Exception:
            pass


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"no space left on device{where}; free some space"
    if isinstance(exc, SQLAlchemyError):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the registry database became unavailable ({first})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, PatchlabError) else f"{type(exc).__name__}: {text}"


class _Run:
    """One upgrade run being executed (or resumed) by this process."""

    def __init__(self, reg: Registry, run: RunInfo, executor: Any, lease: _Lease, device: str, log: Log) -> None:
        self.reg, self.run, self.executor, self.lease, self.device, self.log = reg, run, executor, lease, device, log
        self.work = Path(run.work_dir)
        self.opts = dict(run.options or {})
        self.to_ref = f"{run.family}@{run.to_version}"
        self.steps: dict[tuple[str, str], StepInfo] = {(s.patch, s.step): s for s in run.steps}
        self.plans = {p["name"]: p for p in self.opts.get("patches", [])}
        self.stash: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()
        self._patch_dirs: dict[str, Path] = {}
        self._pairs: dict[str, Future[str | None]] = {}  # base -> its BaseDrift file, measured in the background
        self._pair_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="base-drift")
        self._pair_lock = threading.Lock()
        self._checkpoints: dict[str, Any] = {}
        self._base_paths: dict[str, Path] = {}
        self._loaded_pairs: dict[str, Any] = {}
        self._records: dict[str, bool] = {}
        #: the step each patch is at (kept here too: when the database went away, the rows cannot say)
        self.current: dict[str, str] = {}
        #: a patch's finished step whose end is recorded with its next step's start (see :meth:`do`)
        self._ended: dict[str, StepEnd] = {}

    def patch_dir(self, ref: str) -> Path:
        """A registered patch materialised (and its blobs verified) once per run, not once per step."""
        with self.lock:
            if ref not in self._patch_dirs:
                self._patch_dirs[ref] = self.reg.patch_path(ref)
            return self._patch_dirs[ref]

    def start_base_pair(self, base: str) -> None:
        """Begin measuring the diagnosis sums every patch made on ``base`` shares (``measure.diagnose.BaseDrift``:
        ``base`` -> the new base) in a background thread, beside the first ports: a pass over two bases that
        would otherwise wait for the disk in front of them."""
        with self._pair_lock:
            if base not in self._pairs:
                self._pairs[base] = self._pair_pool.submit(self._measure_base_pair, base)

    def base_pair(self, base: str) -> str | None:
        """The ``BaseDrift`` JSON file of ``base`` (waiting for its measurement); None when no patch needs it."""
        self.start_base_pair(base)
        return self._pairs[base].result()

    def _measure_base_pair(self, base: str) -> str | None:
        """For the tensors of the run's patches on ``base`` whose manifests record their own sums
        (``methods.extract.drift_sums``): the pair's drift recorded in the registry (``registry.drifts``: by
        ``base add`` of the new release, or by an earlier run), with what it lacks measured now and recorded;
        written among the run's reports (a killed run's file is reused)."""
        from patchlab.io.patch import Patch
        from patchlab.measure.diagnose import BaseDrift, base_drift

        out = self.work / "reports" / f"base-drift-{re.sub(r'[^A-Za-z0-9_.@-]', '_', base)}.json"
        if out.is_file():  # whole or absent (written atomically)
            return str(out)
        names = set()
        for p in self.plans.values():
            if p["base"] == base and p.get("kind", "port") != "merge":
                names |= {e.name for e in Patch.open(self.patch_dir(p["source"])).entries() if e.drift_sums}
        if not names:
            return None
        source, target = self.base_path(base), self.base_path(self.to_ref)
        pair = self.reg.base_drift(base, self.to_ref) or BaseDrift(str(source), str(target), {})
        missing = pair.missing(sorted(names), self.checkpoint(base), self.checkpoint(self.to_ref))
        if missing:
            self.log(f"measuring how {self.to_ref} moved from {base} ({len(missing)} tensors)")
            got = base_drift(source, target, missing, device=self.device, release_source=True)
            self.reg.record_base_drift(base, self.to_ref, got)
            pair.tensors.update(got.tensors)
            pair.target_sumsq.update(got.target_sumsq)
        else:
            self.log(f"the drift of {self.to_ref} from {base} is recorded: neither base is read for it")
        write_atomic(out, pair.dumps())
        return str(out)

    def base_path(self, ref: str) -> Path:
        """A base's checkpoint directory, located and its files checked once per run (``checkpoint_path``) rather
        than at every step of every patch."""
        with self.lock:
            got = self._base_paths.get(ref)
        if got is None:
            got = self.reg.checkpoint_path(ref)
            with self.lock:
                self._base_paths[ref] = got
        return got

    def checkpoint(self, ref: str) -> Any:
        """A base of the run opened once (``patchlab.io.checkpoint.Checkpoint``): every patch's diagnosis reads
        the same two bases' headers."""
        from patchlab.io.checkpoint import Checkpoint

        path = self.base_path(ref)  # outside the lock: base_path takes it
        with self.lock:
            if ref not in self._checkpoints:
                self._checkpoints[ref] = Checkpoint.open(path)
            return self._checkpoints[ref]

    def loaded_base_pair(self, base: str) -> Any:
        """The ``BaseDrift`` of ``base`` (waiting for its measurement), parsed once; None when none is needed."""
        from patchlab.measure.diagnose import BaseDrift

        path = self.base_pair(base)
        with self.lock:
            if base not in self._loaded_pairs:
                self._loaded_pairs[base] = BaseDrift.loads(Path(path).read_text()) if path else None
            return self._loaded_pairs[base]

    def records_sums(self, ref: str) -> bool:
        """Does patch ``ref`` record its drift sums (so that a port need not read its base to diagnose it)?"""
        from patchlab.io.patch import Patch

        with self.lock:
            if ref in self._records:
                return self._records[ref]
        got = any(e.drift_sums for e in Patch.open(self.patch_dir(ref)).entries())
        with self.lock:
            self._records[ref] = got
        return got

    def close(self) -> None:
        self._pair_pool.shutdown(wait=True, cancel_futures=True)

    # -- step bookkeeping --

    def state(self, patch: str, step: str) -> StepInfo:
        with self.lock:
            have = self.steps.get((patch, step))
        if have is None:  # a run begun by a patchlab without this step: add it, pending
            first = next(s for (n, _), s in self.steps.items() if n == patch)
            self.reg.ensure_steps(self.run.id, [(patch, first.source, first.position, step)])
            self._refresh(patch, step)
            with self.lock:
                have = self.steps[(patch, step)]
        return have

    def _refresh(self, patch: str, step: str) -> None:
        fresh = self.reg.get_step(self.run.id, patch, step)
        with self.lock:
            self.steps[(patch, step)] = fresh

    def do(self, patch: str, step: str, fn: Callable[[], dict[str, Any]]) -> Any:
        """Run ``fn`` as ``step`` of ``patch`` unless done; ``fn`` returns (state, outcome, paths...).

        The step's end is recorded together with the start of the patch's next step (one commit between two
        steps; :meth:`settle` records a last one): a kill in between redoes the step, as a kill before its
        record always did."""
        st = self.state(patch, step)
        if st.state in ("done", "skipped"):
            self.settle(patch)
            return st.outcome
        if self.lease.lost:
            self.settle(patch)
            raise UpgradeError(f"the lease on {self.to_ref} was taken over by another process; stopping")
        with self.lock:
            ended = self._ended.pop(patch, None)
            # until the previous step's end is recorded, a failure is that step's (it reruns on resume)
            self.current[patch] = ended.step if ended is not None else step
        started = utcnow()
        self.reg.step_moved(self.run.id, patch, ended=ended, starts=step, at=started)
        with self.lock:
            self.current[patch] = step
        t0 = time.perf_counter()
        self.log(f"{patch}: {step}")
        res = fn()
        state, finished = res.pop("_state", "done"), utcnow()
        end = StepEnd(
            step,
            state,
            outcome=json_safe(res.get("outcome"), "outcome"),
            output_path=res.get("output_path"),
            report_path=res.get("report_path"),
            at=finished,
            started=started,
        )
        info = dataclasses.replace(
            st,
            state=state,
            outcome=json.loads(json.dumps(end.outcome)),  # as a later read would give it back
            output_path=end.output_path if end.output_path is not None else st.output_path,
            report_path=end.report_path if end.report_path is not None else st.report_path,
            error=None,
            attempts=(st.attempts or 0) + 1,
            started_at=timestamp(started),
            finished_at=timestamp(finished),
            seconds=(finished - started).total_seconds(),
        )
        with self.lock:
            self.steps[(patch, step)] = info
            self._ended[patch] = end
        self.log(f"{patch}: {step} {state} ({time.perf_counter() - t0:.2f} s)")
        return info.outcome

    def settle(self, patch: str) -> None:
        """Record the end of ``patch``'s last finished step if :meth:`do` still holds it."""
        with self.lock:
            ended = self._ended.pop(patch, None)
        if ended is not None:
            self.reg.step_moved(self.run.id, patch, ended=ended)

    # -- the pipeline of one patch --

    def patch(self, name: str) -> None:
        p = self.plans[name]
        src, base, suite = p["source"], p["base"], list(p["suite"])
        models, patches, reports = self.work / "models", self.work / "patches", self.work / "reports"
        target = str(self.base_path(self.to_ref))
        policy = self.opts.get("vocab_policy")
        ft = p["finetuned"] if p["finetuned"] and Path(p["finetuned"]).is_dir() else None
        kind = p.get("kind", "port")
        if kind == "merge":
            ft = None
        # NAME@n+1 carries NAME@n's Δ onto the new base: port from the stored patch, register without re-extracting
        carry = bool(self.opts.get("carry_delta")) and kind in ("port", "edit")
        port_ft = None if carry else ft  # else fused when the fine-tune is at hand, then re-extracted

        diag_out = reports / f"{name}.diagnostics.json"
        observed_out = reports / f"{name}.observed-sums.json"  # what the port gathered for the diagnosis
        sums_out = reports / f"{name}.drift-sums.json"  # the Δ's sums against the new base, for NAME@n+1

        def diagnose_step() -> dict[str, Any]:
            from patchlab.measure.diagnose import Diagnosis, PortDiagnostics

            if diag_out.is_file():  # a killed run finished it: written whole
                d = PortDiagnostics.from_json(json.loads(diag_out.read_text()))
            else:
                diag = Diagnosis(
                    self.patch_dir(src),
                    self.checkpoint(self.to_ref),
                    source_base=self.checkpoint(base),
                    intruders=bool(self.opts.get("intruders", True)),
                    device=self.device,
                    base_pair=self.loaded_base_pair(base),
                )
                if observed_out.is_file():  # gathered on the port's own reads (port_task(diagnose=)): finish it
                    diag.load_observed(json.loads(observed_out.read_text()))
                d = diag.result()
                if carry:
                    write_atomic(sums_out, json.dumps(diag.target_sums()))
                write_atomic(diag_out, d.dumps())
            return {
                "outcome": {"verdict": d.verdict.level, "reasons": d.verdict.reasons},
                "output_path": str(diag_out),
            }

        # a port from the stored patch measures the diagnosis on its own reads: port first, then diagnose
        port_first = kind != "merge" and port_ft is None
        if not port_first:
            verdict = self.do(name, "diagnose", diagnose_step)["verdict"]

        def port_args() -> dict[str, Any]:
            return {
                "out": str(models / name),
                "target": target,
                "patch_dir": None if port_ft else str(self.patch_dir(src)),
                "finetuned": port_ft,
                "source_base": str(self.base_path(base)) if port_ft else None,
                "vocab_policy": policy,
                "device": self.device,
                "diagnose": {
                    "source_base": str(self.base_path(base)),
                    "intruders": bool(self.opts.get("intruders", True)),
                    "out": str(observed_out),
                    "pair_later": self.records_sums(src),
                }
                if port_first and self.state(name, "diagnose").state != "done"
                else None,
            }

        def eval_args() -> dict[str, Any]:
            return {"model": str(models / name), "suite": suite, "device": self.device}

        def merge_step() -> dict[str, Any]:
            """A merged patch: rebuilt from its parents' versions on the new base with its recorded recipe."""
            parents = self.merge_parents(name, p)
            res = self.executor.merge(
                {
                    "patch_out": str(patches / name),
                    "out": str(models / name),
                    "target": target,
                    "parents": [str(self.patch_dir(r)) for r in parents],
                    "recipe": dict(p.get("recipe") or {}),
                    "vocab_policy": policy,
                    "device": self.device,
                }
            )
            if res.get("reused"):
                self.log(f"{name}: reused the rebuilt patch an interrupted run left at {patches / name}")
            out = models / name
            if not complete_model(out) or not (patches / name / "patch.json").is_file():
                raise UpgradeError(f"the rebuild of {src} did not leave a complete patch and model under {self.work}")
            derived = self.reg.add_derived(  # or the row an interrupted run recorded for this output
                src,
                out,
                base=self.to_ref,
                kind="port",
                parameters={"upgrade_run": self.run.id, "merge": parents},
                reuse=True,
            )
            return {
                "outcome": {"fused": False, "rebuilt": True, "parents": parents, "derived": derived.ref},
                "output_path": str(out),
            }

        def port_step() -> dict[str, Any]:
            if kind == "merge":
                return merge_step()
            if getattr(self.executor, "bundles", False) and self.state(name, "evaluate").state != "done":
                both = self.executor.port_and_evaluate(port_args(), eval_args())
                res, self.stash[(name, "evaluate")] = both["port"], both["evaluate"]
            else:
                res = self.executor.port(port_args())
            if res.get("reused"):
                self.log(f"{name}: reused the complete model an interrupted run left at {models / name}")
            out = models / name
            if not complete_model(out):
                raise UpgradeError(f"the port of {src} did not leave a complete model at {out}")
            derived = self.reg.add_derived(  # or the row an interrupted run recorded for this output
                src,
                out,
                base=self.to_ref,
                kind="port",
                parameters={"upgrade_run": self.run.id, "fused": bool(port_ft)},
                reuse=True,
            )
            return {
                "outcome": {"fused": bool(port_ft), "derived": derived.ref},
                "output_path": str(out),
            }

        self.do(name, "port", port_step)
        if port_first:
            verdict = self.do(name, "diagnose", diagnose_step)["verdict"]

        def register_step() -> dict[str, Any]:
            import patchlab

            if carry:  # the same Δ on the new base: apply(NAME@n+1, target) is this port, bit for bit
                info = self.reg.add_ported_patch(
                    src,
                    base=self.to_ref,
                    name=name,
                    description=f"upgrade run {self.run.id}: {src} ported onto {self.to_ref}",
                    parameters={"upgrade_run": self.run.id},
                    drift_sums=json.loads(sums_out.read_text()) if sums_out.is_file() else None,
                    base_dir=target,
                )
                return {"outcome": {"ref": info.ref, "digest": info.digest, "carried": True}}
            out = patches / name
            clean_partials(out)
            if not (out / "patch.json").is_file():
                if out.exists():
                    shutil.rmtree(out)
                patchlab.extract(target, models / name, out, vocab_policy=policy, device=self.device)
            if kind == "merge":  # the rebuilt patch (port step) records the recipe again, for the next release
                parents, relation = list(self.state(name, "port").outcome["parents"]), "merge"
                why = f"{src} rebuilt from {', '.join(parents)}"
            else:
                parents, relation, why = [src], "port", f"{src} ported"
            info = self.reg.add_patch(
                out,
                name=name,
                base=self.to_ref,
                parents=parents,
                relation=relation,
                description=f"upgrade run {self.run.id}: {why} onto {self.to_ref}",
            )
            return {"outcome": {"ref": info.ref, "digest": info.digest}, "output_path": str(out)}

        new_ref = self.do(name, "register", register_step)["ref"]

        def record(ref: str, result_json: dict[str, Any]) -> list[int]:
            """Store an evaluation on ``ref`` once per run: tasks this run already stored are not stored again."""
            from patchlab.measure.results import EvalResult

            res = EvalResult.from_json(result_json)
            res.settings = {**(res.settings or {}), "upgrade_run": self.run.id}
            have = {
                e.dataset: e.id
                for e in self.reg.list_evaluations(ref, kind="patch")
                if isinstance(e.settings, dict) and e.settings.get("upgrade_run") == self.run.id
            }
            missing = [t for t in res.tasks if t not in have]
            if missing:
                sub = EvalResult(
                    model=res.model,
                    tasks={t: res.tasks[t] for t in missing},
                    instances=[i for i in res.instances if i.task in missing],
                    settings=res.settings,
                )
                for e in self.reg.record_eval_result(ref, sub, kind="patch"):
                    have[e.dataset] = e.id
            return [have[t] for t in res.tasks]

        def check_suite() -> None:
            if not suite:
                raise UpgradeError(
                    f"patch {name} has no evaluation suite; set one with `patchlab gate set {name} --suite FILE`"
                )
            for f in suite:
                if not Path(f).is_file():
                    raise UpgradeError(
                        f"suite file {f} of patch {name} is missing; restore it or set another with "
                        f"`patchlab gate set {name} --suite FILE`"
                    )

        def evaluate_step() -> dict[str, Any]:
            check_suite()
            res = self.stash.pop((name, "evaluate"), None) or self.executor.evaluate(eval_args())
            ids = record(new_ref, res)
            acc = {t: s["accuracy"] for t, s in res["tasks"].items()}
            return {"outcome": {"tasks": acc, "evaluations": ids}}

        tasks = list(self.do(name, "evaluate", evaluate_step)["tasks"])

        edit_figures: dict[str, Any] = {}
        if kind == "edit":
            edit_figures = self.do(name, EDIT_STEP, lambda: self.edits_step(name, p, src, new_ref, models / name))

        def baseline_step() -> dict[str, Any]:
            stored = {e.dataset for e in self.reg.list_evaluations(src, kind="patch")}
            if set(tasks) <= stored:
                return {"outcome": {"stored": True}}
            check_suite()
            scratch = models / f".baseline-{name}"
            res = self.executor.baseline(
                {
                    "patch_dir": str(self.patch_dir(src)),
                    "source_base": str(self.base_path(base)),
                    "finetuned": ft,
                    "scratch": str(scratch),
                    "suite": suite,
                    "device": self.device,
                }
            )
            return {"outcome": {"stored": False, "evaluations": record(src, res)}}

        self.do(name, "baseline", baseline_step)

        def flips_step() -> dict[str, Any]:
            from patchlab.measure.flips import compare

            old = self.reg.eval_result(src, kind="patch", tasks=tasks)
            new = self.reg.eval_result(new_ref, kind="patch", tasks=tasks)
            self.stash[(name, "evals")] = (old, new)  # the report shows them: read once
            f = compare(old.flip_records(), new.flip_records(), allow_missing=True)
            out = reports / f"{name}.flips.json"
            write_atomic(out, f.dumps())
            o = f.overall
            return {
                "outcome": {
                    "nfr": o.nfr,
                    "pfr": o.pfr,
                    "accuracy_old": o.accuracy_old,
                    "accuracy_new": o.accuracy_new,
                    "n": o.n,
                    "negative_flips": o.n_negative_flips,
                },
                "output_path": str(out),
            }

        flips = self.do(name, "flips", flips_step)

        def gate_step() -> dict[str, Any]:
            from patchlab.measure.gate import check_gates

            values = {
                "nfr": flips["nfr"],
                "pfr": flips["pfr"],
                "accuracy": flips["accuracy_new"],
                "old": flips["accuracy_old"],
                "verdict": verdict,
                **{k: edit_figures.get(k) for k in ("reliability", "generalization", "locality") if edit_figures},
            }
            results = [r.to_json() for r in check_gates(list(p["gates"]), values)]
            passed = all(r["passed"] for r in results)
            return {"outcome": {"passed": passed, "results": results, "values": values}}

        gate = self.do(name, "gate", gate_step)

        def alias_step() -> dict[str, Any]:
            alias = p["alias"]
            if not gate["passed"]:
                failed = "; ".join(f"{r['expression']} ({r['detail']})" for r in gate["results"] if not r["passed"])
                # NAME@latest means the newest version while no alias of that name exists: pin it to the
                # version it meant before this run, so a failed port never becomes "latest" by default
                pinned = None
                if not any(a.scope == name and a.name == alias for a in self.reg.list_aliases()):
                    pinned = self.reg.set_alias(alias, src, kind="patch").target
                return {
                    "_state": "skipped",
                    "outcome": {"moved": False, "alias": alias, "kept_at": pinned, "reason": f"gate failed: {failed}"},
                }
            a = self.reg.set_alias(alias, new_ref, kind="patch")
            return {"outcome": {"moved": True, "alias": a.ref, "target": a.target}}

        alias = self.do(name, "alias", alias_step)

        def report_step() -> dict[str, Any]:
            from patchlab.measure.diagnose import PortDiagnostics
            from patchlab.report.render import build_report, render

            diag = PortDiagnostics.from_json(json.loads((reports / f"{name}.diagnostics.json").read_text()))
            flips_json = json.loads((reports / f"{name}.flips.json").read_text())
            old, new = self.stash.pop((name, "evals"), None) or (
                self.reg.eval_result(src, kind="patch", tasks=tasks),
                self.reg.eval_result(new_ref, kind="patch", tasks=tasks),
            )
            evals = {f"previous ({src})": old, f"ported ({new_ref})": new}
            notes = [f"gate {'passed' if gate['passed'] else 'FAILED'}"]
            notes += [
                f"{'pass' if r['passed'] else 'FAIL'}: {r['expression']} ({r['detail']})" for r in gate["results"]
            ]
            notes.append(
                f"alias {alias['alias']} moved to {new_ref}"
                if alias.get("moved")
                else f"alias not moved: {alias['reason']}"
            )
            rep = build_report(
                title=f"Upgrading {src} onto {self.to_ref}",
                diagnostics=diag,
                flips=flips_json,
                evaluations=evals,
                notes=notes,
                meta={
                    "run": self.run.id,
                    "previous": src,
                    "ported": new_ref,
                    "port": "fused" if port_ft else "from patch",
                },
            )
            paths = {}
            for fmt in SUMMARY_FORMATS:
                out = reports / f"{name}.{fmt}"
                write_atomic(out, render(rep, fmt))
                paths[fmt] = str(out)
            return {"outcome": {"paths": paths}, "report_path": paths["html"]}

        self.do(name, "report", report_step)

        org = self.opts.get("push")
        if org:

            def push_step() -> dict[str, Any]:
                from registry.workflows.publish import push as hub_push

                if not gate["passed"]:
                    return {"_state": "skipped", "outcome": {"pushed": False, "reason": "gate failed"}}
                repo = f"{org}/{name}"
                res = hub_push(self.reg, new_ref, repo, report=reports / f"{name}.json")
                return {
                    "outcome": {
                        "pushed": True,
                        "repo": repo,
                        "commit": res.result.commit_sha,
                        "created_commit": res.result.created_commit,
                    }
                }

            self.do(name, "push", push_step)

    def merge_parents(self, name: str, p: dict[str, Any]) -> list[str]:
        """The versions on the new base of a merged patch's parents, in its recipe's order: what this run
        registered for them, else the newest already there."""
        out = []
        for parent in p.get("parents") or []:
            with self.lock:
                st = self.steps.get((parent, "register"))
            ref = (st.outcome or {}).get("ref") if st is not None and st.state == "done" else None
            ref = ref or _version_on(self.reg, parent, self.to_ref)
            if ref is None:
                raise UpgradeError(
                    f"merged patch {name} needs its parent {parent} on {self.to_ref}, which it does not have (its "
                    "upgrade failed or was left out); fix that and rerun"
                )
            out.append(ref)
        return out

    def edits_step(self, name: str, p: dict[str, Any], src: str, new_ref: str, model: Path) -> dict[str, Any]:
        """An edit patch: its recorded edit set, checked against its digest, evaluated (WILD) on the ported
        model against the new base's unedited outputs; the figures are stored on ``NAME@n+1``."""
        from patchlab.io.edits import edits_digest, load_edits
        from patchlab.methods.edit_patch import evaluate_model

        edits = p.get("edits") or {}
        file, want = edits.get("file"), edits.get("sha256")
        if not file or not Path(file).is_file():
            raise UpgradeError(
                f"the edit set of {src} ({file or 'not recorded'}) is missing; restore it to re-evaluate the edits"
            )
        if want and edits_digest(load_edits(file)) != want:
            raise UpgradeError(f"the edit set {file} of {src} changed since the edit (sha256 differs); restore it")
        stored = [
            e
            for e in self.reg.list_evaluations(new_ref, kind="patch")
            if e.dataset == "wild" and isinstance(e.settings, dict) and e.settings.get("upgrade_run") == self.run.id
        ]
        if stored:
            m = stored[0].metrics or {}
        else:
            ev = evaluate_model(model, file, base=self.base_path(self.to_ref), device=self.device)
            rec = self.reg.record_edit_evaluation(
                new_ref, ev, kind="patch", settings={"upgrade_run": self.run.id, "edits_file": file}
            )
            m = rec[0].metrics or {}
        old = next((e.metrics for e in self.reg.list_evaluations(src, kind="patch") if e.dataset == "wild"), None)
        out = {k: m.get(k) for k in ("reliability", "generalization", "locality", "n_edits", "edits_sha256")}
        out["reliability_old"] = (old or {}).get("reliability")
        return {"outcome": out}


def run_upgrade(
    reg: Registry,
    family: str,
    to: str,
    *,
    from_version: str | None = None,
    patches: Sequence[str] | None = None,
    alias: str | None = None,
    vocab_policy: str | None = None,
    push: str | None = None,
    jobs: int = 1,
    executor: Any = None,
    device: str = "auto",
    wait: bool = False,
    intruders: bool = False,
    lease_seconds: float = LEASE_SECONDS,
    log: Log = lambda s: None,
) -> UpgradeResult:
    """Run (or resume) the upgrade of ``family`` to version ``to``. The same call after an interruption
    continues the unfinished run; after a finished one it returns that run (``already_done``). ``push``: a Hub
    organisation; each patch that passes its gate is pushed to ``ORG/NAME`` (``registry.workflows.publish``).
    ``intruders``: add the intruder-dimension analysis (two SVDs per matrix: minutes on a 1B model on CPU; it
    only ever raises the verdict to "port with care") to each patch's diagnosis."""
    from registry.workflows.executors import LocalExecutor

    reg.get_base(f"{family}@{to}")  # unknown family/version: one clear line before anything else
    key = f"{family}@{to}"
    lease = _Lease(reg, key, wait=wait, log=log, seconds=lease_seconds)
    own_executor = executor is None
    executor = executor or LocalExecutor()
    r: _Run | None = None
    try:
        prev = reg.latest_run(family, to)
        resumed = prev is not None and prev.state != "done"
        if prev is not None and prev.state == "done":
            names = {s.patch for s in prev.steps}
            if not patches or set(patches) <= names:
                return UpgradeResult(prev, prev.summary or {}, resumed=False, already_done=True)
        if resumed:
            run = prev
            log(f"resuming upgrade run {run.id} of {key}")
        else:
            plan = plan_upgrade(
                reg, family, to, from_version=from_version, patches=patches, vocab_policy=vocab_policy, device=device
            )
            if plan.problems:
                raise UpgradeError(plan.problems[0])
            opts = {
                "patches": [
                    {**p.to_dict(), "alias": alias or p.alias, "suite": list(p.suite), "gates": list(p.gates)}
                    for p in plan.patches
                ],
                "vocab_policy": plan.vocab_policy,
                # without a vocabulary change a port is target + Δ with Δ as stored: NAME@n+1 is that Δ on the
                # new base (Registry.add_ported_patch), no re-extraction
                "carry_delta": not plan.vocab_change,
                "intruders": intruders,
                "push": push,
                "requested": {"patches": list(patches or []), "alias": alias, "from": from_version},
            }
            run = reg.create_run(family, to, from_version=from_version, options=opts, work_dir="")
            work = reg.home / "upgrades" / f"run-{run.id}"
            reg.set_run_work_dir(run.id, str(work))
            reg.ensure_steps(
                run.id,
                [
                    (p.name, p.source, i, step)
                    for i, p in enumerate(plan.patches)
                    for step in steps_for(p.kind) + (("push",) if push else ())
                ],
            )
            run = reg.get_run(run.id)
            log(f"upgrade run {run.id}: {len(plan.patches)} patch(es) of {family} onto {key}")
        lease.attach(run.id)
        if push and (run.options or {}).get("push") != push:  # a resumed run asked to push now
            reg.set_run_options(run.id, {**(run.options or {}), "push": push})
        reg.mark_run(run.id, "running")
        r = _Run(reg, reg.get_run(run.id), executor, lease, device, log)
        for d in ("models", "patches", "reports"):
            (r.work / d).mkdir(parents=True, exist_ok=True)
        plans = r.opts["patches"]
        # merged patches are rebuilt from their parents' new versions: they run once every other patch has
        phases = [
            [p["name"] for p in plans if p.get("kind") != "merge"],
            [p["name"] for p in plans if p.get("kind") == "merge"],
        ]
        failures: list[tuple[str, BaseException]] = []
        for p in plans:  # the bases' shared diagnosis sums, measured beside the first ports
            if p.get("kind") != "merge" and r.state(p["name"], "diagnose").state not in ("done", "skipped"):
                r.start_base_pair(p["base"])

        def one(name: str) -> None:
            try:
                r.patch(name)
                r.settle(name)
            except BaseException as exc:  # noqa: BLE001 - every failure is recorded, then reported
                failures.append((name, exc))
                _record_failure(reg, r, name, exc)

        for names in phases:
            if failures:
                break
            if jobs <= 1:
                for n in names:
                    one(n)
                    if failures:
                        break
            else:
                with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="upgrade") as pool:
                    list(pool.map(one, names))
        if failures:
            name, exc = failures[0]
            try:
                steps = reg.get_run(run.id).steps
            except SQLAlchemyError:  # the database is still away: the step this process was at
                steps = []
            step = next((s.step for s in steps if s.patch == name and s.state == "failed"), None)
            step = step or r.current.get(name, "?")
            again = "once the registry is back " if isinstance(exc, SQLAlchemyError) else ""
            raise UpgradeError(
                f"upgrade run {run.id} failed at step {step} of {r.plans[name]['source']}: {_one_line(exc)}; "
                f"rerun the same command {again}to resume"
            ) from exc
        summary = write_summary(reg, reg.get_run(run.id))
        reg.mark_run(run.id, "done", summary=summary)
        return UpgradeResult(reg.get_run(run.id), summary, resumed=resumed)
    except SQLAlchemyError as exc:
        raise UpgradeError(
            f"{_one_line(exc)}; the run stays resumable: rerun the same command once the registry is back"
        ) from exc
    finally:
        if r is not None:
            r.close()
        lease.release()
        if own_executor:
            executor.close()


def _record_failure(reg: Registry, r: _Run, name: str, exc: BaseException) -> None:
    """Mark the running step of ``name`` and the run failed (best effort: the database may be what failed)."""
    msg = _one_line(exc)
    try:
        r.settle(name)  # the step before the failure did finish
        run = reg.get_run(r.run.id)
        step = next((s for s in run.steps if s.patch == name and s.state == "running"), None)
        if step is not None:
            reg.step_finished(r.run.id, name, step.step, "failed", error=msg)
        reg.mark_run(r.run.id, "failed", error=msg, failed_step=f"{name}:{step.step if step else '?'}")
    except Exception:  # noqa: BLE001 - the database itself is gone; the rerun will find the step running
        pass


# ---- the run summary --------------------------------------------------------------------------------------


def summarise_run(run: RunInfo) -> dict[str, Any]:
    """The run's table as a plain dict (the source of the Markdown, JSON and HTML summaries)."""
    by_patch: dict[str, dict[str, StepInfo]] = {}
    for s in run.steps:
        by_patch.setdefault(s.patch, {})[s.step] = s
    rows = []
    work = Path(run.work_dir)
    for name, steps in by_patch.items():

        def out(step: str, steps: dict[str, StepInfo] = steps) -> dict[str, Any]:
            st = steps.get(step)
            return (st.outcome or {}) if st is not None and st.state in ("done", "skipped") else {}

        gate, flips, alias = out("gate"), out("flips"), out("alias")
        failed = [s for s in steps.values() if s.state == "failed"]
        reports = out("report").get("paths", {})
        rows.append(
            {
                "patch": name,
                "source": next(iter(steps.values())).source,
                "new": out("register").get("ref"),
                "verdict": out("diagnose").get("verdict"),
                "fused": out("port").get("fused"),
                "accuracy_old": flips.get("accuracy_old"),
                "accuracy_new": flips.get("accuracy_new"),
                "nfr": flips.get("nfr"),
                "pfr": flips.get("pfr"),
                "reliability": out(EDIT_STEP).get("reliability"),
                "gate": ("pass" if gate.get("passed") else "fail") if gate else ("error" if failed else "pending"),
                "gate_results": gate.get("results", []),
                "alias": alias.get("alias"),
                "alias_moved": bool(alias.get("moved")),
                "reason": alias.get("reason") or (f"{failed[0].step} failed: {failed[0].error}" if failed else None),
                "reports": {k: os.path.relpath(v, work) for k, v in reports.items()},
                "seconds": round(sum(s.seconds or 0.0 for s in steps.values()), 3),
                "steps": {s.step: {"state": s.state, "seconds": s.seconds} for s in steps.values()},
            }
        )
    return {
        "format": "patchlab-upgrade-summary",
        "format_version": 1,
        "run": run.id,
        "family": run.family,
        "from": run.from_version,
        "to": run.to_version,
        "state": run.state,
        "started_at": run.started_at,
        "work_dir": run.work_dir,
        "patches": rows,
        "passed": sum(r["gate"] == "pass" for r in rows),
        "failed": sum(r["gate"] != "pass" for r in rows),
    }


def write_summary(reg: Registry, run: RunInfo) -> dict[str, Any]:
    """Write summary.{md,json,html} into the run directory; returns the summary with their paths."""
    from patchlab.report.upgrade import render_summary

    summary = summarise_run(run)
    summary["state"] = "done"
    work = Path(run.work_dir)
    summary["summary_files"] = {fmt: str(work / f"summary.{fmt}") for fmt in SUMMARY_FORMATS}
    for fmt in SUMMARY_FORMATS:
        write_atomic(work / f"summary.{fmt}", render_summary(summary, fmt))
    return summary
