"""Upgrades' state: gates and suites (per patch name, with family defaults), upgrade runs and their
per-patch steps, the lease that keeps two runs of one family+version apart, and release watches.

The workflow (``registry.workflows.upgrade``) drives these; they only read and write rows.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from registry import refs
from registry.db import retry_locked
from registry.errors import InvalidReferenceError, RegistryError, UnknownReferenceError
from registry.records import fields_dict, timestamp
from registry.rows import GateRow, LeaseRow, UpgradeRunRow, UpgradeStepRow, WatchRow, utcnow
from registry.topic import Topic, json_safe

VOCAB_POLICIES = ("pad-zero", "truncate", "by-token", "skip-embeddings")
DEFAULT_GATES = ("verdict != 'do not port'",)
DEFAULT_ALIAS = "latest"
LEASE_SECONDS = 60.0


def _step_statements() -> tuple[Any, Any, Any]:
    """The three statements a step's move runs, built once: building an UPDATE costs SQLAlchemy more than
    SQLite takes to run it, and a driver moves every patch's steps (``Upgrades.step_moved``)."""
    t, r = UpgradeStepRow.__table__.c, UpgradeRunRow.__table__.c
    where = (t.run_id == bindparam("w_run"), t.patch == bindparam("w_patch"), t.step == bindparam("w_step"))
    ended = (
        update(UpgradeStepRow.__table__)
        .where(*where)
        .values(
            state=bindparam("v_state", type_=t.state.type),
            error=bindparam("v_error", type_=t.error.type),
            outcome=bindparam("v_outcome", type_=t.outcome.type),
            finished_at=bindparam("v_at", type_=t.finished_at.type),
            seconds=bindparam("v_seconds", type_=t.seconds.type),
            # a path not given keeps the one recorded
            output_path=func.coalesce(bindparam("v_output", type_=t.output_path.type), t.output_path),
            report_path=func.coalesce(bindparam("v_report", type_=t.report_path.type), t.report_path),
        )
    )
    starts = (
        update(UpgradeStepRow.__table__)
        .where(*where)
        .values(
            state="running",
            error=None,
            started_at=bindparam("v_at", type_=t.started_at.type),
            finished_at=None,
            seconds=None,
            attempts=t.attempts + 1,
        )
    )
    touch = (
        update(UpgradeRunRow.__table__)
        .where(r.id == bindparam("w_run"))
        .values(updated_at=bindparam("v_at", type_=r.updated_at.type))
    )
    return ended, starts, touch


_STEP_ENDED, _STEP_STARTS, _RUN_TOUCHED = _step_statements()


class LeaseHeldError(RegistryError):
    """Another live process holds the upgrade lease of this family and version."""

    exit_code = 3


@dataclass(frozen=True)
class GateInfo:
    scope_kind: str  # patch | family
    scope: str
    suite: tuple[str, ...]
    expressions: tuple[str, ...]
    alias: str | None
    vocab_policy: str | None
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@dataclass(frozen=True)
class EffectiveGate:
    """What judges one patch: its own settings, falling back to its family's, then to the defaults."""

    patch: str
    suite: tuple[str, ...]
    expressions: tuple[str, ...]
    alias: str
    sources: dict[str, str] = field(default_factory=dict)  # setting -> "patch" | "family" | "default"

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@dataclass(frozen=True)
class StepInfo:
    id: int
    run_id: int
    patch: str
    source: str
    position: int
    step: str
    state: str
    outcome: Any
    output_path: str | None
    report_path: str | None
    error: str | None
    attempts: int
    started_at: str
    finished_at: str
    seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@dataclass(frozen=True)
class StepEnd:
    """How a step of an upgrade run ended, as the driver records it (``Upgrades.step_moved``)."""

    step: str
    state: str  # done | skipped | failed
    outcome: Any = None
    output_path: str | None = None
    report_path: str | None = None
    error: str | None = None
    at: _dt.datetime | None = None  # when it ended (naive UTC); default: when recorded
    started: _dt.datetime | None = None  # when it started, as recorded (by the driver: the row need not be read)


@dataclass(frozen=True)
class RunInfo:
    id: int
    family: str
    from_version: str | None
    to_version: str
    state: str
    options: Any
    work_dir: str
    failed_step: str | None
    error: str | None
    summary: Any
    started_at: str
    updated_at: str
    finished_at: str
    steps: tuple[StepInfo, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.family}@{self.to_version}"

    def to_dict(self) -> dict[str, Any]:
        d = fields_dict(self)
        d["steps"] = [s.to_dict() for s in self.steps]
        return d


def _gate_info(r: GateRow) -> GateInfo:
    return GateInfo(
        r.scope_kind,
        r.scope,
        tuple(r.suite or ()),
        tuple(r.expressions or ()),
        r.alias,
        r.vocab_policy,
        timestamp(r.updated_at),
    )


def _step_info(r: UpgradeStepRow) -> StepInfo:
    return StepInfo(
        r.id,
        r.run_id,
        r.patch,
        r.source,
        r.position,
        r.step,
        r.state,
        r.outcome,
        r.output_path,
        r.report_path,
        r.error,
        r.attempts,
        timestamp(r.started_at),
        timestamp(r.finished_at),
        r.seconds,
    )


def _run_info(r: UpgradeRunRow, steps: Sequence[UpgradeStepRow] = ()) -> RunInfo:
    return RunInfo(
        r.id,
        r.family,
        r.from_version,
        r.to_version,
        r.state,
        r.options,
        r.work_dir,
        r.failed_step,
        r.error,
        r.summary,
        timestamp(r.started_at),
        timestamp(r.updated_at),
        timestamp(r.finished_at),
        tuple(_step_info(s) for s in steps),
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Upgrades(Topic):
    # ---- gates and suites -----------------------------------------------------------------------------

    def set_gate(
        self,
        scope: str,
        *,
        family: bool = False,
        suite: Iterable[str] | None = None,
        expressions: Iterable[str] | None = None,
        alias: str | None = None,
        vocab_policy: str | None = None,
    ) -> GateInfo:
        """Set what judges patch name ``scope`` (or, with ``family``, the defaults of family ``scope``).
        Settings not given keep their stored value. Expressions are parsed first: a bad one changes nothing."""
        from patchlab.measure.gate import parse_gates

        kind = "family" if family else "patch"
        refs.validate_name(scope, "family name" if family else "patch name")
        exprs = list(expressions) if expressions is not None else None
        if exprs is not None:
            parse_gates(exprs)
        files = [os.path.abspath(os.path.expanduser(f)) for f in suite] if suite is not None else None
        if alias is not None:
            refs.validate_name(alias, "alias")
        if vocab_policy is not None and vocab_policy not in VOCAB_POLICIES:
            raise InvalidReferenceError(f"vocabulary policy {vocab_policy!r} is not one of {', '.join(VOCAB_POLICIES)}")

        def run() -> GateInfo:
            with self.db.write() as s:
                row = s.execute(
                    select(GateRow).where(GateRow.scope_kind == kind, GateRow.scope == scope)
                ).scalar_one_or_none()
                if row is None:
                    row = GateRow(scope_kind=kind, scope=scope)
                    s.add(row)
                if files is not None:
                    row.suite = files
                if exprs is not None:
                    row.expressions = exprs
                if alias is not None:
                    row.alias = alias
                if vocab_policy is not None:
                    row.vocab_policy = vocab_policy
                row.updated_at = utcnow()
                s.flush()
                return _gate_info(row)

        return retry_locked(run)

    def get_gate(self, scope: str, *, family: bool = False) -> GateInfo | None:
        kind = "family" if family else "patch"
        with self.db.read() as s:
            row = s.execute(
                select(GateRow).where(GateRow.scope_kind == kind, GateRow.scope == scope)
            ).scalar_one_or_none()
            return _gate_info(row) if row is not None else None

    def effective_gate(self, patch_name: str, family: str | None) -> EffectiveGate:
        own = self.get_gate(patch_name)
        fam = self.get_gate(family, family=True) if family else None
        sources: dict[str, str] = {}

        def pick(attr: str, default: Any) -> Any:
            for where, g in (("patch", own), ("family", fam)):
                v = getattr(g, attr) if g is not None else None
                if v:
                    sources[attr] = where
                    return v
            sources[attr] = "default"
            return default

        return EffectiveGate(
            patch_name,
            tuple(pick("suite", ())),
            tuple(pick("expressions", DEFAULT_GATES)),
            pick("alias", DEFAULT_ALIAS),
            sources,
        )

    def family_vocab_policy(self, family: str) -> str | None:
        g = self.get_gate(family, family=True)
        return g.vocab_policy if g is not None else None

    # ---- runs and steps ----------------------------------------------------------------------------

    def create_run(
        self, family: str, to_version: str, *, from_version: str | None, options: Mapping[str, Any], work_dir: str
    ) -> RunInfo:
        def run() -> RunInfo:
            with self.db.write() as s:
                row = UpgradeRunRow(
                    family=family,
                    from_version=from_version,
                    to_version=to_version,
                    state="running",
                    options=json_safe(dict(options), "options"),
                    work_dir=work_dir,
                )
                s.add(row)
                s.flush()
                return _run_info(row)

        return retry_locked(run)

    def set_run_work_dir(self, run_id: int, work_dir: str) -> None:
        self._update_run(run_id, work_dir=work_dir)

    def set_run_options(self, run_id: int, options: Mapping[str, Any]) -> None:
        self._update_run(run_id, options=json_safe(dict(options), "options"))

    def latest_run(self, family: str, to_version: str) -> RunInfo | None:
        with self.db.read() as s:
            row = s.execute(
                select(UpgradeRunRow)
                .where(UpgradeRunRow.family == family, UpgradeRunRow.to_version == to_version)
                .order_by(UpgradeRunRow.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            return self._with_steps(s, row) if row is not None else None

    def get_run(self, run_id: int | None = None) -> RunInfo:
        """A run with its steps; the newest run when ``run_id`` is None."""
        with self.db.read() as s:
            q = select(UpgradeRunRow)
            q = q.where(UpgradeRunRow.id == run_id) if run_id is not None else q.order_by(UpgradeRunRow.id.desc())
            row = s.execute(q.limit(1)).scalar_one_or_none()
            if row is None:
                raise UnknownReferenceError(
                    f"no upgrade run {run_id}" if run_id is not None else "no upgrade runs yet (`patchlab upgrade`)"
                )
            return self._with_steps(s, row)

    def list_runs(self, family: str | None = None) -> list[RunInfo]:
        with self.db.read() as s:
            q = select(UpgradeRunRow).order_by(UpgradeRunRow.id)
            if family is not None:
                q = q.where(UpgradeRunRow.family == family)
            return [_run_info(r) for r in s.execute(q).scalars()]

    @staticmethod
    def _with_steps(s, row: UpgradeRunRow) -> RunInfo:
        steps = (
            s.execute(
                select(UpgradeStepRow)
                .where(UpgradeStepRow.run_id == row.id)
                .order_by(UpgradeStepRow.position, UpgradeStepRow.id)
            )
            .scalars()
            .all()
        )
        return _run_info(row, steps)

    def _update_run(self, run_id: int, **values: Any) -> None:
        def run() -> None:
            with self.db.write() as s:
                s.execute(update(UpgradeRunRow).where(UpgradeRunRow.id == run_id).values(updated_at=utcnow(), **values))

        retry_locked(run)

    def mark_run(
        self,
        run_id: int,
        state: str,
        *,
        error: str | None = None,
        failed_step: str | None = None,
        summary: Any = None,
    ) -> None:
        values: dict[str, Any] = {"state": state, "error": error, "failed_step": failed_step}
        if summary is not None:
            values["summary"] = json_safe(summary, "summary")
        values["finished_at"] = utcnow() if state in ("done", "failed") else None
        self._update_run(run_id, **values)

    def ensure_steps(self, run_id: int, rows: Sequence[tuple[str, str, int, str]]) -> None:
        """Create the (patch, source, position, step) rows a run needs that it does not have yet (pending)."""

        def run() -> None:
            with self.db.write() as s:
                have = {
                    (p, st)
                    for p, st in s.execute(
                        select(UpgradeStepRow.patch, UpgradeStepRow.step).where(UpgradeStepRow.run_id == run_id)
                    ).all()
                }
                new = [
                    {"run_id": run_id, "patch": patch, "source": source, "position": pos, "step": step}
                    for patch, source, pos, step in rows
                    if (patch, step) not in have
                ]
                if new:  # one statement for them all
                    s.execute(insert(UpgradeStepRow), [{**r, "state": "pending", "attempts": 0} for r in new])

        retry_locked(run)

    def step_started(self, run_id: int, patch: str, step: str) -> None:
        self.step_moved(run_id, patch, starts=step)

    def step_finished(
        self,
        run_id: int,
        patch: str,
        step: str,
        state: str,
        *,
        outcome: Any = None,
        output_path: str | None = None,
        report_path: str | None = None,
        error: str | None = None,
    ) -> StepInfo:
        """Record how a step ended; returns the step as stored (the driver need not read it back)."""
        end = StepEnd(step, state, outcome=outcome, output_path=output_path, report_path=report_path, error=error)
        got = self.step_moved(run_id, patch, ended=end)
        assert got is not None
        return got

    def step_moved(
        self,
        run_id: int,
        patch: str,
        *,
        ended: StepEnd | None = None,
        starts: str | None = None,
        at: _dt.datetime | None = None,
    ) -> StepInfo | None:
        """In one transaction: how ``patch``'s step ``ended`` (if given) and that its step ``starts`` is running
        (if given, from ``at``: default now). The driver's one commit between two steps of a patch, rather than
        one for each. Returns the ended step as stored when its start was not given (``StepEnd.started``)."""
        if ended is not None:
            json_safe(ended.outcome, "outcome")

        def run() -> StepInfo | None:
            with self.db.write() as s:
                info = None
                conn = s.connection()
                if ended is not None:
                    now, began = ended.at or utcnow(), ended.started
                    if began is None:  # not given (a step another call started): as recorded
                        began = self._step_row(s, run_id, patch, ended.step).started_at
                    values = {
                        "v_state": ended.state,
                        "v_error": ended.error,
                        "v_outcome": ended.outcome,
                        "v_at": now,
                        "v_seconds": (now - began).total_seconds() if began is not None else None,
                        "v_output": ended.output_path,
                        "v_report": ended.report_path,
                    }
                    self._moved(conn, _STEP_ENDED, run_id, patch, ended.step, values)
                    if ended.started is None:  # the caller wants the step as stored
                        info = self._step_info_now(s, run_id, patch, ended.step)
                if starts is not None:
                    self._moved(conn, _STEP_STARTS, run_id, patch, starts, {"v_at": at or utcnow()})
                conn.execute(_RUN_TOUCHED, {"w_run": run_id, "v_at": utcnow()})
                return info

        return retry_locked(run)

    def get_step(self, run_id: int, patch: str, step: str) -> StepInfo:
        """One step of a run (a driver refreshing what it just wrote reads one row, not the whole run)."""
        with self.db.read() as s:
            return _step_info(self._step_row(s, run_id, patch, step))

    @classmethod
    def _step_info_now(cls, s, run_id: int, patch: str, step: str) -> StepInfo:
        """The step as a later read gives it back (tuples as lists, keys as strings)."""
        row = cls._step_row(s, run_id, patch, step)
        s.refresh(row)
        info = _step_info(row)
        return dataclasses.replace(info, outcome=json.loads(json.dumps(info.outcome)))

    @staticmethod
    def _moved(conn, stmt: Any, run_id: int, patch: str, step: str, values: dict[str, Any]) -> None:
        got = conn.execute(stmt, {"w_run": run_id, "w_patch": patch, "w_step": step, **values})
        if got.rowcount != 1:
            raise UnknownReferenceError(f"upgrade run {run_id} has no step {step} for {patch}")

    @staticmethod
    def _step_row(s, run_id: int, patch: str, step: str) -> UpgradeStepRow:
        row = s.execute(
            select(UpgradeStepRow).where(
                UpgradeStepRow.run_id == run_id, UpgradeStepRow.patch == patch, UpgradeStepRow.step == step
            )
        ).scalar_one_or_none()
        if row is None:
            raise UnknownReferenceError(f"upgrade run {run_id} has no step {step} for {patch}")
        return row

    # ---- the lease --------------------------------------------------------------------------------------

    def acquire_lease(self, key: str, *, run_id: int | None = None, seconds: float = LEASE_SECONDS) -> str:
        """Take the lease on ``key``; returns its token. Refuses (:class:`LeaseHeldError`) while another live
        holder has it. A lease whose time ran out, or whose holder on this host is no longer running (a
        ``kill -9``), is taken over."""
        host, pid, token = socket.gethostname(), os.getpid(), uuid.uuid4().hex

        def run() -> str:
            with self.db.write() as s:
                now = utcnow()
                row = s.get(LeaseRow, key)
                if row is not None:
                    stale = row.expires_at <= now or (row.holder_host == host and not pid_alive(row.holder_pid))
                    mine = row.holder_host == host and row.holder_pid == pid
                    if not stale and not mine:
                        left = (row.expires_at - now).total_seconds()
                        raise LeaseHeldError(
                            f"the upgrade of {key} is already running (pid {row.holder_pid} on {row.holder_host}"
                            + (f", run {row.run_id}" if row.run_id else "")
                            + f"; lease valid {left:.0f} s more); wait for it, or pass --wait"
                        )
                    s.delete(row)
                    s.flush()
                s.add(
                    LeaseRow(
                        key=key,
                        run_id=run_id,
                        holder_pid=pid,
                        holder_host=host,
                        token=token,
                        expires_at=now + _dt.timedelta(seconds=seconds),
                    )
                )
                return token

        def guarded() -> str:
            try:
                return run()
            except IntegrityError:  # a concurrent taker inserted first (server databases)
                return run()

        return retry_locked(guarded)

    def renew_lease(self, key: str, token: str, *, run_id: int | None = None, seconds: float = LEASE_SECONDS) -> bool:
        """Extend our lease; False when it is no longer ours (taken over after expiring)."""

        def run() -> bool:
            with self.db.write() as s:
                values: dict[str, Any] = {"expires_at": utcnow() + _dt.timedelta(seconds=seconds)}
                if run_id is not None:
                    values["run_id"] = run_id
                n = s.execute(update(LeaseRow).where(LeaseRow.key == key, LeaseRow.token == token).values(**values))
                return bool(n.rowcount)

        return retry_locked(run)

    def release_lease(self, key: str, token: str) -> None:
        def run() -> None:
            with self.db.write() as s:
                s.execute(delete(LeaseRow).where(LeaseRow.key == key, LeaseRow.token == token))

        retry_locked(run)

    def lease_holder(self, key: str) -> dict[str, Any] | None:
        with self.db.read() as s:
            row = s.get(LeaseRow, key)
            if row is None:
                return None
            return {
                "key": row.key,
                "run_id": row.run_id,
                "pid": row.holder_pid,
                "host": row.holder_host,
                "expires_at": timestamp(row.expires_at),
            }

    # ---- watches ----------------------------------------------------------------------------------------

    def watch_seen(self, family: str, source: str) -> tuple[str | None, list[str]]:
        """The last release key a watch has seen, and every one it has seen."""
        with self.db.read() as s:
            row = s.execute(
                select(WatchRow).where(WatchRow.family == family, WatchRow.source == source)
            ).scalar_one_or_none()
            return (row.last_seen, list(row.seen or [])) if row is not None else (None, [])

    def record_watch(self, family: str, source: str, release: str) -> None:
        def run() -> None:
            with self.db.write() as s:
                row = s.execute(
                    select(WatchRow).where(WatchRow.family == family, WatchRow.source == source)
                ).scalar_one_or_none()
                if row is None:
                    row = WatchRow(family=family, source=source, seen=[])
                    s.add(row)
                seen = list(row.seen or [])
                if release not in seen:
                    seen.append(release)
                row.seen, row.last_seen, row.updated_at = seen, release, utcnow()

        retry_locked(run)
