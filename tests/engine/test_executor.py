"""The streaming engine on synthetic jobs: placement of chunks, ordering, errors, scratch buffers."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from patchlab.engine import executor as engine
from patchlab.engine.executor import Job, Shard, run, scratch
from patchlab.errors import CorruptCheckpointError
from patchlab.io.safetensors import MappedFile


def _jittery_job(name: str, rows: int, cols: int, *, parallel: bool, log: list | None = None) -> Job:
    """``out[r] = r * cols + c`` in fp32, with random delays so workers finish chunks out of order."""

    def load(r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        time.sleep(random.random() * 0.002)
        return (torch.arange(r0 * cols, r1 * cols, dtype=torch.float32).reshape(r1 - r0, cols),)

    def compute(x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
        if log is not None:
            log.append((name, r0, threading.current_thread().name))
        time.sleep(random.random() * 0.002)
        return x[0]

    return Job(name, (rows, cols), torch.float32, load, compute, parallel=parallel)


@pytest.mark.parametrize("parallel", [True, False])
def test_chunks_land_at_their_place_whatever_order_they_finish(tmp_path, monkeypatch, parallel):
    monkeypatch.setenv("PATCHLAB_WORKERS", "3")
    jobs = [_jittery_job("a", 37, 5, parallel=parallel), _jittery_job("b", 11, 3, parallel=parallel)]
    run([Shard("x.safetensors", jobs)], tmp_path, torch.device("cpu"), chunk_elems=10)
    got = load_file(tmp_path / "x.safetensors")
    assert torch.equal(got["a"], torch.arange(37 * 5, dtype=torch.float32).reshape(37, 5))
    assert torch.equal(got["b"], torch.arange(11 * 3, dtype=torch.float32).reshape(11, 3))


def test_stateful_jobs_compute_in_chunk_order_and_finish_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHLAB_WORKERS", "3")
    log: list = []
    finished: list[str] = []
    jobs = []
    for name in ("a", "b"):
        j = _jittery_job(name, 40, 4, parallel=False, log=log)
        j.finish = lambda n=name: finished.append(n)
        jobs.append(j)
    # the first chunk's load waits until another worker is loading too, so chunks really do overlap
    first, other = threading.current_thread(), threading.Event()
    load_a = jobs[0].load

    def load(r0: int, r1: int):
        if r0 == 0:
            nonlocal first
            first = threading.current_thread()
            other.wait(timeout=10)
        elif threading.current_thread() is not first:
            other.set()
        return load_a(r0, r1)

    jobs[0].load = load
    run([Shard("x.safetensors", jobs)], tmp_path, torch.device("cpu"), chunk_elems=8)
    assert [(n, r0) for n, r0, _ in log] == [(n, r0) for n in ("a", "b") for r0 in range(0, 40, 2)]
    assert len({t for _, _, t in log}) > 1  # the work really was spread over workers
    assert sorted(finished) == ["a", "b"]


def test_an_error_on_any_worker_stops_the_run_and_removes_the_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHLAB_WORKERS", "2")
    job = _jittery_job("a", 200, 4, parallel=True)
    load = job.load

    def failing(r0: int, r1: int):
        if r0 >= 100:
            raise RuntimeError(f"disk on fire at row {r0}")
        return load(r0, r1)

    job.load = failing
    with pytest.raises(RuntimeError, match="disk on fire"):
        run([Shard("x.safetensors", [job])], tmp_path, torch.device("cpu"), chunk_elems=8)
    assert list(tmp_path.iterdir()) == []


def test_no_output_dir_runs_jobs_for_their_side_effects(tmp_path):
    seen: list[int] = []
    job = _jittery_job("a", 12, 2, parallel=False)
    job.finish = lambda: seen.append(1)
    run([Shard("x.safetensors", [job])], None, torch.device("cpu"), chunk_elems=4)
    assert seen == [1] and list(tmp_path.iterdir()) == []


def test_scratch_is_reused_per_slot_and_private_to_each_thread():
    a = scratch("t.a", (4, 8), torch.float32)
    b = scratch("t.a", (2, 8), torch.float32)
    assert b.data_ptr() == a.data_ptr()  # the same memory, not a new allocation
    assert scratch("t.b", (2, 8), torch.float32).data_ptr() != a.data_ptr()
    assert scratch("t.a", (2, 8), torch.bfloat16).dtype == torch.bfloat16
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(scratch("t.a", (4, 8), torch.float32).data_ptr()))
    t.start()
    t.join()
    assert other[0] != a.data_ptr()
    engine.release_scratch()


def test_rows_read_into_a_buffer_and_refuse_a_wrong_one(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(10, 6).to(torch.bfloat16)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    f = MappedFile(tmp_path / "m.safetensors")
    buf = torch.empty(3, 6, dtype=torch.bfloat16)
    got = f.rows("w", 4, 7, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, w[4:7])
    assert torch.equal(f.rows("w", 8, 20), w[8:])  # clamped to the tensor's rows
    with pytest.raises(ValueError, match="need"):
        f.rows("w", 0, 3, out=torch.empty(3, 6, dtype=torch.float32))
    f.close()


def test_a_file_truncated_while_open_is_reported(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(100, 100)}, str(tmp_path / "m.safetensors"))
    f = MappedFile(tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        f.rows("w", 50, 100)
    f.close()


def test_atomic_output_marks_its_kind_even_when_not_told(tmp_path):
    """A writer that does not name its kind (a new method) still leaves the right marker (issue 10)."""
    import json

    from patchlab.engine.executor import atomic_output

    with atomic_output(tmp_path / "p") as tmp:
        (tmp / "patch.json").write_text("{}")
    assert json.loads((tmp_path / "p" / ".patchlab-output.json").read_text())["kind"] == "patch"
    with atomic_output(tmp_path / "m") as tmp:
        (tmp / "config.json").write_text("{}")
    assert json.loads((tmp_path / "m" / ".patchlab-output.json").read_text())["kind"] == "model"
