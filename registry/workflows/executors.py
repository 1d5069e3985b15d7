"""Where an upgrade's heavy steps run: in this process (``local``) or as Ray tasks (``ray``).

Either way the functions are those of ``registry.workflows.upgrade_tasks`` (paths in, files and JSON out);
only the driver writes to the registry. Ray workers must see the driver's paths (the registry's cache, the
base checkpoints, the run directory): a shared file system. ``RayExecutor`` checks that first, on a worker,
and refuses clearly when a worker cannot reach them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from registry.errors import RegistryError
from registry.workflows import upgrade_tasks as tasks


class ExecutorError(RegistryError):
    """The executor cannot run the upgrade's tasks (Ray missing, a worker that cannot see the files, a dead worker)."""


class LocalExecutor:
    """Runs each task in the calling thread (``--jobs N`` gives N threads)."""

    name = "local"
    bundles = False

    def port(self, args: dict[str, Any]) -> dict[str, Any]:
        return tasks.port_task(**args)

    def merge(self, args: dict[str, Any]) -> dict[str, Any]:
        return tasks.merge_task(**args)

    def evaluate(self, args: dict[str, Any]) -> dict[str, Any]:
        return tasks.evaluate_task(**args)

    def baseline(self, args: dict[str, Any]) -> dict[str, Any]:
        return tasks.baseline_task(**args)

    def check_paths(self, paths: list[str]) -> None:
        return None

    def close(self) -> None:
        return None


def _source_root() -> str:
    import patchlab

    return str(Path(patchlab.__file__).resolve().parent.parent)


class RayExecutor:
    """Each patch's port+evaluation as one Ray task (one GPU per task when CUDA is present).

    ``address`` joins a running cluster (``ray start --head`` / ``auto``); without it a local Ray instance is
    started with ``num_cpus``. Workers import the same patchlab source as the driver (``PYTHONPATH``).
    """

    name = "ray"
    bundles = True

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, max_retries: int = 0) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'patchlab[ray]' (or pip install ray)") from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            env = {
                "env_vars": {
                    "PYTHONPATH": os.pathsep.join(filter(None, [_source_root(), os.environ.get("PYTHONPATH")]))
                }
            }
            kw: dict[str, Any] = {"runtime_env": env, "include_dashboard": False, "log_to_driver": False}
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=num_cpus or 2, **kw)
            self._started = True
        try:
            import torch

            gpus = 1 if torch.cuda.is_available() else 0
        except Exception:  # pragma: no cover
            gpus = 0
        opts = {"num_gpus": gpus, "max_retries": max_retries}
        self._bundle = ray.remote(**opts)(tasks.port_and_evaluate_task)
        self._port = ray.remote(**opts)(tasks.port_task)
        self._eval = ray.remote(**opts)(tasks.evaluate_task)
        self._merge = ray.remote(**opts)(tasks.merge_task)
        self._baseline = ray.remote(**opts)(tasks.baseline_task)
        self._reach = ray.remote(num_cpus=0, max_retries=max_retries)(tasks.reachable)

    def _get(self, ref: Any, what: str) -> Any:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
                raise cause from None
            raise ExecutorError(f"the Ray task for {what} failed: {str(exc).splitlines()[0]}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.RayError) as exc:
            raise ExecutorError(
                f"the Ray worker running {what} died ({type(exc).__name__}); rerun the same command to resume"
            ) from None

    def check_paths(self, paths: list[str]) -> None:
        missing = self._get(self._reach.remote(paths), "the path check")
        if missing:
            raise ExecutorError(
                f"a Ray worker cannot see {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ": --executor ray needs the registry home, the base checkpoints and the run directory on a file "
                "system every worker mounts at the same path (see docs/upgrade.md)"
            )

    def port_and_evaluate(self, port: dict[str, Any] | None, evaluate: dict[str, Any] | None) -> dict[str, Any]:
        self.check_paths(
            [p for p in (port or {}).values() if isinstance(p, str) and os.path.isabs(p) and p != port["out"]]
        )
        return self._get(
            self._bundle.remote(port, evaluate),
            f"port+evaluate of {Path((port or evaluate or {}).get('out', '?')).name}",
        )

    def port(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._get(self._port.remote(**args), f"port to {args['out']}")

    def merge(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._get(self._merge.remote(**args), f"merge rebuild to {args['out']}")

    def evaluate(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._get(self._eval.remote(**args), f"evaluation of {args['model']}")

    def baseline(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._get(self._baseline.remote(**args), "the previous version's evaluation")

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def make_executor(name: str, *, address: str | None = None, num_cpus: int | None = None) -> Any:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, num_cpus=num_cpus)
    raise ExecutorError(f"unknown executor {name!r}; use local or ray")
