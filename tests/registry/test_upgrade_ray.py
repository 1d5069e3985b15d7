"""``--executor ray``: each patch's port+evaluation as a Ray task on one real local Ray instance (shared by the
module); only the driver writes to the registry, workers get paths, never the database. On SQLite and on the
suite's PostgreSQL server (module-wide ``backend``): the end-to-end outcome with two patches at once equals the
local executor's, a worker that cannot see the files is refused clearly, a worker that dies fails the run at
the right step and the same call resumes it to the uninterrupted result; on PostgreSQL, the server going away
during a Ray task fails the run with one line and the rerun finishes it once the server is back."""

from __future__ import annotations

import os
from typing import Any

import pytest

from registry.workflows.upgrade import UpgradeError, run_upgrade
from tests.registry.conftest import BACKENDS
from tests.upgrade_helpers import build_family, check_end_to_end, copy_family, differences, state, strays, unordered

ray = pytest.importorskip("ray", reason="pip install 'patchlab[ray]'")

#: the executor's Ray remote functions (what the driver submits)
REMOTES = ("_bundle", "_port", "_eval", "_merge", "_baseline", "_reach")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def executor():
    """One local Ray instance (2 CPUs) for every test of the module, both backends."""
    from registry.workflows.executors import RayExecutor

    ex = RayExecutor(num_cpus=2)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def family(request, backend, tmp_path_factory):
    server = request.getfixturevalue("pg_server") if backend == "postgresql" else None
    return build_family(tmp_path_factory.mktemp("family"), backend=backend, server=server)


class _Recorder:
    """A Ray remote function that records what the driver submits to it."""

    def __init__(self, fn: Any, seen: list[tuple[str, Any]], name: str) -> None:
        self.fn, self.seen, self.name = fn, seen, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.seen.append((self.name, (args, kwargs)))
        return self.fn.remote(*args, **kwargs)


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


@pytest.fixture(scope="module")
def reference(family, executor, tmp_path_factory):
    """One uninterrupted upgrade on Ray (per backend), two patches at once (``--jobs 2``: two driver threads
    writing to the registry while their Ray tasks run side by side): its registry, result, final state (without
    what depends on the order patches finish in) and what the driver submitted to Ray."""
    fam = copy_family(family, tmp_path_factory.mktemp("reference") / "fam")
    seen: list[tuple[str, Any]] = []
    real = {name: getattr(executor, name) for name in REMOTES}
    for name, fn in real.items():
        setattr(executor, name, _Recorder(fn, seen, name))
    try:
        with fam.open() as reg:
            result = run_upgrade(reg, "tiny", "v2", device="cpu", executor=executor, jobs=2)
    finally:
        for name, fn in real.items():
            setattr(executor, name, fn)
    return fam, result, unordered(state(fam)), seen


def test_end_to_end_on_ray_pass_fail_lineage_alias_summary(reference):
    fam, result, _, _ = reference
    check_end_to_end(fam, result)


def test_workers_get_paths_never_the_database(reference):
    """Every port+evaluation and the baseline ran as Ray tasks, and nothing submitted names the database."""
    fam, _, _, seen = reference
    kinds = [name for name, _ in seen]
    assert kinds.count("_bundle") == 3 and "_baseline" in kinds, kinds  # stored@1 has no stored results
    db = fam.url or str(fam.home / "registry.db")
    shipped = [s for _, call in seen for s in _strings(call)]
    assert shipped and not [s for s in shipped if db in s or "://" in s or s.endswith("registry.db")]


def test_ray_gives_the_local_result(family, reference, tmp_path):
    """The same upgrade with the local executor leaves the same registry (patches, tensors, aliases, lineage,
    evaluations, steps) as on Ray."""
    fam = copy_family(family, tmp_path / "fam")
    with fam.open() as reg:
        assert run_upgrade(reg, "tiny", "v2", device="cpu").run.state == "done"
    after = unordered(state(fam))
    assert not differences(after, reference[2]), differences(after, reference[2])


def test_worker_that_cannot_see_the_files_is_refused(executor):
    from registry.workflows.executors import ExecutorError

    with pytest.raises(ExecutorError, match="a Ray worker cannot see /nowhere/at/all.*file system every worker"):
        executor.check_paths(["/nowhere/at/all"])


def test_worker_death_fails_the_step_and_resumes_to_the_same_result(family, reference, executor, tmp_path):
    """The worker porting ``strict`` (the second patch) dies: the run fails at that step, ``stored`` stays
    done; the same call on Ray resumes it and the registry equals the uninterrupted run's."""
    from registry.workflows.upgrade_tasks import port_and_evaluate_task

    fam = copy_family(family, tmp_path / "fam")

    def die_on_strict(port, evaluate):
        if port is not None and port["out"].endswith("/strict"):
            os._exit(1)
        return port_and_evaluate_task(port, evaluate)

    real = executor._bundle
    executor._bundle = ray.remote(num_gpus=0, max_retries=0)(die_on_strict)
    try:
        with fam.open() as reg:
            with pytest.raises(UpgradeError, match="failed at step port of strict@1: the Ray worker .* died") as e:
                run_upgrade(reg, "tiny", "v2", device="cpu", executor=executor)
            assert "\n" not in str(e.value) and "rerun the same command" in str(e.value)
            run = reg.get_run()
            assert run.state == "failed" and run.failed_step == "strict:port"
            assert {s.state for s in run.steps if s.patch == "stored"} <= {"done", "skipped"}
    finally:
        executor._bundle = real
    with fam.open() as reg:
        done = run_upgrade(reg, "tiny", "v2", device="cpu", executor=executor)
        assert done.resumed and done.run.id == run.id and done.run.state == "done"
    after = unordered(state(fam))
    assert not differences(after, reference[2]), differences(after, reference[2])
    assert strays(fam) == []


@pytest.mark.postgresql
def test_database_gone_during_a_ray_task_is_one_line_and_resumes(pg_server_alone, executor, tmp_path):
    """The PostgreSQL server stops (``pg_ctl stop -m fast``) while a Ray worker ports and evaluates: the worker
    finishes without it, the driver's next write fails the run with one line; with the server back, the same
    call reuses the worker's model and finishes."""
    server = pg_server_alone
    fam = build_family(tmp_path / "fam", patches=("task",), backend="postgresql", server=server)
    real = executor.port_and_evaluate

    def away(port, evaluate):
        server.take_down()
        return real(port, evaluate)

    executor.port_and_evaluate = away
    try:
        with fam.open() as reg:
            with pytest.raises(UpgradeError, match="failed at step port of task@1: the registry database became") as e:
                run_upgrade(reg, "tiny", "v2", device="cpu", executor=executor)
        assert "\n" not in str(e.value) and "rerun the same command once the registry is back" in str(e.value)
    finally:
        del executor.port_and_evaluate
        server.bring_back()
    logs: list[str] = []
    with fam.open() as reg:
        done = run_upgrade(reg, "tiny", "v2", device="cpu", executor=executor, log=logs.append)
        assert done.resumed and done.run.state == "done" and done.all_passed
        assert reg.get_patch("task@latest").ref == "task@2"
        assert reg.get_patch("task@2").parents == (("task@1", "port"),)
        assert reg.verify().ok
    assert any("reused the complete model" in line for line in logs), logs
    assert strays(fam) == []
