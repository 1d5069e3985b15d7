"""The one streaming engine: read, compute on the device, write, one chunk at a time per worker.

Work is a list of shards, each a list of ``Job``s (one output tensor each). A job is split into row chunks of
about ``chunk_elems`` elements. Workers take chunks in order; each reads its chunk's inputs, computes it and
writes it at its fixed place in the output shard, so reading, computing and writing overlap across workers
and nothing but one chunk per worker is ever in memory, whatever the size of the model. The output directory
appears atomically: everything is written into a temporary sibling and renamed at the end; on any error the
temporary directory is removed.
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from patchlab.cores import worker_count
from patchlab.errors import NoSpaceError
from patchlab.io.outputs import atomic_output, check_output  # the output rules live in io.outputs
from patchlab.io.safetensors import ShardWriter, TensorSpec

CHUNK_ELEMS = 1 << 19  # 512K elements: 2 MiB per fp32 operand, so intermediates stay in cache
ADVISE_AHEAD = 16  # chunks: ask the kernel to start reading this far ahead (cold files; no cost when cached)
Inputs = tuple[torch.Tensor, ...]


_SCRATCH = threading.local()


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A reusable buffer of ``shape`` for the chunk in hand, private to the calling thread.

    It stays valid until the same slot is asked for again on this thread. The engine's workers finish a
    chunk (load, compute, write) before they take the next, so a job may use scratch for anything that
    does not outlive its chunk, its output included. Warm, reused buffers halved the wall time of a CPU
    port against fresh ones per chunk, which the allocator hands back to the kernel and then has to
    page-fault and zero again.
    """
    pool: dict | None = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    n = math.prod(shape)
    key = (slot, dtype, str(device))
    buf = pool.get(key)
    if buf is None or buf.numel() < n:
        buf = pool[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


_LIBC = None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc ``malloc_trim``; elsewhere nothing).

    Jobs that keep small per-chunk results until their tensor is done (extract's residuals) interleave
    them with freed per-chunk temporaries, and glibc keeps such a fragmented heap's free pages: +250 MiB
    of anonymous memory on a 2-layer bf16 extract. Trimming once per finished tensor, and every few chunks
    that keep results (``trim_heap_every``), brings it back to the live set; no process-wide allocator
    setting is changed.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            lib = ctypes.CDLL(None)
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def trim_heap_every(n: int) -> None:
    """:func:`trim_heap` on every ``n``-th call from this thread (a trim costs ~1 ms: not once a chunk)."""
    k = getattr(_SCRATCH, "trim_calls", 0) + 1
    _SCRATCH.trim_calls = k
    if k % n == 0:
        trim_heap()


def release_scratch() -> None:
    """Free the calling thread's scratch buffers (workers do so when a run ends; so should other callers)."""
    _SCRATCH.pool = None


Sink = Callable[["Job", int, int, torch.Tensor], None]  # (job, first row, end row, output chunk)


@dataclass
class Job:
    """One output tensor: how to load a chunk of its inputs and how to compute the output chunk."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[int, int], Inputs]
    compute: Callable[[Inputs, int, int], torch.Tensor]
    advise: Callable[[int, int], None] | None = None
    finish: Callable[[], None] | None = None
    # compute keeps no state from chunk to chunk, so chunks may be computed by several workers at once
    parallel: bool = False

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


@dataclass
class Shard:
    file: str
    jobs: list[Job]
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})

    @property
    def nbytes(self) -> int:
        return sum(j.spec.nbytes for j in self.jobs)


def _chunks(job: Job, chunk_elems: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_elems // max(1, job.row_elems))
    if job.rows == 0:
        yield 0, 0
        return
    for r0 in range(0, job.rows, step):
        yield r0, min(job.rows, r0 + step)


class _Schedule:
    """Hands out chunks in order to the workers and keeps the per-job bookkeeping.

    Chunks of ``parallel`` jobs are computed wherever they are loaded. Chunks of the other jobs carry
    state from chunk to chunk (running statistics, residuals), so their ``compute`` calls take turns in
    chunk order; their loads still overlap. A job's ``finish`` runs once, after its last chunk.
    """

    def __init__(
        self, work: list[tuple[int, Job, int, int]], progress: Callable[[int], None] | None, sink: Sink | None
    ):
        self.work, self.progress, self.sink = work, progress, sink
        self.next = 0
        self.turn = 0  # the next ordered chunk allowed to compute
        self.order: list[int] = []
        self.left: dict[int, int] = {}
        seq = 0
        for _, job, _, _ in work:
            self.left[id(job)] = self.left.get(id(job), 0) + 1
            self.order.append(-1 if job.parallel else seq)
            seq += 0 if job.parallel else 1
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def take(self) -> int | None:
        with self.cond:
            if self.error is not None or self.next >= len(self.work):
                return None
            self.next += 1
            return self.next - 1

    def wait_turn(self, i: int) -> bool:
        with self.cond:
            while self.turn != self.order[i] and self.error is None:
                self.cond.wait()
            return self.error is None

    def end_turn(self) -> None:
        with self.cond:
            self.turn += 1
            self.cond.notify_all()

    def done(self, job: Job, nbytes: int) -> bool:
        """Count a finished chunk; True when it was the job's last."""
        with self.cond:
            self.left[id(job)] -= 1
            if self.progress and nbytes:
                self.progress(nbytes)
            return self.left[id(job)] == 0

    def fail(self, e: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = e
            self.cond.notify_all()


def run(
    shards: list[Shard],
    out_dir: Path | None,
    device: torch.device,
    *,
    progress: Callable[[int], None] | None = None,
    chunk_elems: int | None = None,
    sink: Sink | None = None,
    workers: int | None = None,
) -> None:
    """Execute every job of every shard, streaming. ``out_dir=None`` writes no file: each output chunk goes
    to ``sink`` (when given), or the jobs run for their side effects only (statistics, diagnostics).

    ``workers`` threads (default :func:`worker_count`; the calling thread is one) each take the next chunk,
    read its inputs with positional reads, compute it and write it at its place in its output file, with no
    hand-off between threads: on a 2-core machine every hand-off was a futex wake-up and a fight for the GIL, and those
    cost more than the arithmetic. On CPU torch runs single-threaded for the duration (the chunks are
    small and memory-bound; an OpenMP pool spinning on every chunk cost 5x in wall time on a busy 2-core
    machine); the previous thread count is restored afterwards. Memory is bounded by one chunk per worker.
    """
    chunk_elems = chunk_elems or CHUNK_ELEMS
    work = [
        (si, job, r0, r1) for si, sh in enumerate(shards) for job in sh.jobs for r0, r1 in _chunks(job, chunk_elems)
    ]
    sched = _Schedule(work, progress, sink)
    files: list[ShardWriter] = []
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    if out_dir is not None:
        _check_space(out_dir, sum(sh.nbytes for sh in shards))
    try:
        if out_dir is not None:
            for sh in shards:
                files.append(ShardWriter(out_dir / sh.file, [j.spec for j in sh.jobs], sh.metadata))
        helpers = [
            threading.Thread(target=_worker, args=(sched, files), name=f"patchlab-worker-{k}", daemon=True)
            for k in range(1, workers or worker_count())
        ]
        for t in helpers:
            t.start()
        try:
            _worker(sched, files)
        except BaseException as e:  # KeyboardInterrupt in the calling thread: stop the helpers too
            sched.fail(e)
            raise
        finally:
            for t in helpers:
                t.join()
        if sched.error is not None:
            raise sched.error
        for f in files:
            f.finish()
    except BaseException:
        for f in files:
            f.abort()
        raise
    finally:
        torch.set_num_threads(threads)


def assemble(job: Job, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One job's whole output in memory, computed chunk by chunk by the engine (then its ``finish`` runs).

    For consumers that need a tensor whole (an SVD, a top-k): memory is that tensor plus one chunk per worker.
    """
    out = torch.empty(job.shape, dtype=dtype or job.dtype, device=device)
    flat = out.reshape(job.rows, -1) if job.shape else out.reshape(1, 1)

    def put(j: Job, r0: int, r1: int, chunk: torch.Tensor) -> None:
        flat[r0:r1].copy_(chunk.reshape(r1 - r0, -1))

    run([Shard("", [job])], None, device, sink=put)
    return out


def _check_space(out_dir: Path, need: int) -> None:
    """Refuse, before the first byte, an output the file system cannot hold (rather than fail at 90%)."""
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise NoSpaceError(
            f"the output needs {need / 1e9:.2f} GB but {out_dir.parent} has {free / 1e9:.2f} GB free; "
            "free some space or write the output elsewhere"
        )


def _worker(sched: _Schedule, files: list[ShardWriter]) -> None:
    """Take chunks until there are none left or another worker failed."""
    ahead = ADVISE_AHEAD
    try:
        while (i := sched.take()) is not None:
            si, job, r0, r1 = sched.work[i]
            if i + ahead < len(sched.work):
                nxt = sched.work[i + ahead]
                if nxt[1].advise:
                    nxt[1].advise(nxt[2], nxt[3])
            inputs = job.load(r0, r1)
            if job.parallel:
                out = job.compute(inputs, r0, r1)
            else:
                if not sched.wait_turn(i):
                    return
                try:
                    out = job.compute(inputs, r0, r1)
                finally:
                    sched.end_turn()
            del inputs
            nbytes = 0
            if files:
                if out.dtype != job.dtype or out.device.type != "cpu":
                    out = out.to(dtype=job.dtype).to("cpu")
                expect = (r1 - r0, *job.shape[1:]) if job.shape else ()
                if tuple(out.shape) != expect:
                    out = out.reshape(expect)
                nbytes = files[si].write(job.name, r0 * job.row_elems * out.element_size(), out)
            elif sched.sink is not None:
                sched.sink(job, r0, r1, out)
            del out
            if sched.done(job, nbytes) and job.finish:
                job.finish()
                trim_heap()
    except BaseException as e:
        sched.fail(e)
        if threading.current_thread() is threading.main_thread():
            raise
    finally:
        release_scratch()


__all__ = ["Job", "Shard", "assemble", "atomic_output", "check_output", "run", "scratch", "worker_count"]
