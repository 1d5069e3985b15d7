"""Process entry points for the concurrency test (importable under the spawn start method)."""

from __future__ import annotations


def add_many(home: str, dirs: list[str], tag: str, start) -> int:
    from registry import Registry

    start.wait(30)
    n = 0
    with Registry(home) as reg:
        for i, d in enumerate(dirs):
            reg.add_patch(d, name="shared", tags=[tag])
            reg.add_patch(d, name=f"own-{tag}")
            reg.record_evaluation(
                f"own-{tag}@{i + 1}", "task", [{"id": str(k), "correct": k % 2 == 0} for k in range(5)]
            )
            n += 1
    return n
