"""``--executor ray``: each patch's port+evaluation as a Ray task on a real local Ray instance; only the driver
writes to the registry; a worker that cannot see the files is refused clearly; a worker that dies fails the run
at the right step, resumable."""

from __future__ import annotations

import os

import pytest

from registry.workflows.upgrade import UpgradeError, run_upgrade
from tests.upgrade_helpers import build_family, state

ray = pytest.importorskip("ray", reason="pip install 'patchlab[ray]'")


@pytest.fixture(scope="module")
def executor():
    from registry.workflows.executors import RayExecutor

    ex = RayExecutor(num_cpus=2)
    yield ex
    ex.close()


def test_upgrade_on_ray_matches_local(executor, tmp_path):
    fam = build_family(tmp_path / "fam", patches=("task",))
    with fam.open() as reg:
        res = run_upgrade(reg, "tiny", "v2", device="cpu", executor=executor)
        assert res.all_passed and reg.get_patch("task@latest").ref == "task@2"
        assert reg.get_patch("task@2").parents == (("task@1", "port"),)
        assert reg.verify().ok


def test_worker_that_cannot_see_the_files_is_refused(executor):
    from registry.workflows.executors import ExecutorError

    with pytest.raises(ExecutorError, match="a Ray worker cannot see /nowhere/at/all.*file system every worker"):
        executor.check_paths(["/nowhere/at/all"])


def test_worker_death_fails_the_step_and_resumes(executor, tmp_path):
    from registry.workflows import executors

    fam = build_family(tmp_path / "fam", patches=("task",))

    def die(port, evaluate):
        os._exit(1)

    real = executor._bundle
    executor._bundle = ray.remote(num_gpus=0, max_retries=0)(die)
    try:
        with fam.open() as reg:
            with pytest.raises(UpgradeError, match="failed at step port of task@1: the Ray worker .* died"):
                run_upgrade(reg, "tiny", "v2", device="cpu", executor=executor)
            assert reg.get_run().failed_step == "task:port"
    finally:
        executor._bundle = real
    with fam.open() as reg:
        done = run_upgrade(reg, "tiny", "v2", device="cpu", executor=executors.LocalExecutor())
        assert done.resumed and done.run.state == "done"
    assert state(fam)["aliases"] == [("task@latest", "task@2")]
