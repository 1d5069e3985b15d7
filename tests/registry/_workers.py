"""Process entry points for the concurrency test (importable under the spawn start method)."""

from __future__ import annotations


def add_many(target: str, dirs: list[str], tag: str, start) -> int:
    """Register ``dirs`` into the registry at ``target`` (a directory, or a database URL whose blob home is
    ``$PATCHLAB_HOME``, inherited from the test)."""
    from registry import Registry

    start.wait(30)
    n = 0
    with Registry(target) as reg:
        for i, d in enumerate(dirs):
            reg.add_patch(d, name="shared", tags=[tag])
            reg.add_patch(d, name=f"own-{tag}")
            reg.record_evaluation(
                f"own-{tag}@{i + 1}", "task", [{"id": str(k), "correct": k % 2 == 0} for k in range(5)]
            )
            n += 1
    return n
