"""The one streaming engine: read ahead, compute on the device, write behind.

Work is a list of shards, each a list of ``Job``s (one output tensor each). A job is split into row chunks of
about ``chunk_elems`` elements; while chunk *k* is computed, chunk *k+1* is being read on a thread and chunk
*k−1* written on another. Nothing but a few chunks is ever in memory, whatever the size of the model, and
the output directory appears atomically: everything is written into a temporary sibling and renamed at
the end; on any error the temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DeviceError, OutputExistsError
from .safetensors_io import StreamingWriter, TensorSpec

CHUNK_ELEMS = 1 << 19  # 512K elements: 2 MiB per fp32 operand, so intermediates stay in cache
READERS = 2  # loader threads: loading (mapping + conversion to fp32) is most of the work
_STOP, _ABORT = object(), object()
Inputs = tuple[torch.Tensor, ...]


_ALLOCATOR_TUNED = False


def _keep_chunk_buffers() -> None:
    """Stop glibc from returning every freed chunk buffer to the kernel.

    By default glibc serves multi-MiB allocations with fresh mmaps (or trims the heap after freeing
    them), so each chunk's buffers are page-faulted in anew: 560-680k minor faults per 1.1B-parameter
    port, more system than user time. Raising the mmap and trim thresholds lets freed buffers be reused;
    what is retained is bounded by the few chunks that are alive at once. No-op off glibc.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):
        pass


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU. Asking for CUDA without it is an error."""
    d = str(device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {d!r} requested but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(d)
    except RuntimeError:
        raise DeviceError(f"unknown device {d!r}; use auto, cpu or cuda") from None


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
    # compute has no side effects, so chunks may be computed on the loader threads, in parallel
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


class _Writer(threading.Thread):
    """Writes chunks in order, opening each shard's file when its first chunk arrives."""

    def __init__(self, out_dir: Path, shards: list[Shard], progress: Callable[[int], None] | None):
        super().__init__(daemon=True, name="patchlab-writer")
        self.q: queue.Queue = queue.Queue(maxsize=3)
        self.out_dir, self.shards, self.progress = out_dir, shards, progress
        self.error: BaseException | None = None
        self._current: tuple[int, StreamingWriter] | None = None

    def run(self) -> None:
        item = None
        try:
            while True:
                item = self.q.get()
                if item is _STOP or item is _ABORT:
                    break
                si, chunk = item
                if self._current is None or self._current[0] != si:
                    self._close()
                    sh = self.shards[si]
                    specs = [j.spec for j in sh.jobs]
                    self._current = (si, StreamingWriter(self.out_dir / sh.file, specs, sh.metadata))
                self._current[1].write(chunk)
                if self.progress:
                    self.progress(chunk.numel() * chunk.element_size())
            if item is _ABORT:
                if self._current is not None:
                    self._current[1].abort()
                    self._current = None
            else:
                self._close()
        except BaseException as e:  # surfaced by the main thread
            self.error = e
            if self._current is not None:
                self._current[1].abort()
            while item is not _STOP and item is not _ABORT:  # drain so the producer never blocks
                item = self.q.get()

    def _close(self) -> None:
        if self._current is not None:
            self._current[1].finish()
            self._current = None

    def put(self, item: object) -> None:
        while True:
            if self.error is not None and isinstance(item, tuple):
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue


def run(
    shards: list[Shard],
    out_dir: Path | None,
    device: torch.device,
    *,
    progress: Callable[[int], None] | None = None,
    chunk_elems: int | None = None,
) -> None:
    """Execute every job of every shard, streaming. ``out_dir=None`` runs the jobs for their side effects
    only (statistics, diagnostics) and writes nothing.

    Three stages overlap: a reader thread loads chunk *k+1* (one ``preadv`` per input, with the kernel
    asked to read further ahead), the calling thread computes chunk *k*, a writer thread writes chunk
    *k−1*. On CPU torch runs single-threaded for the duration: the chunks are small and memory-bound, and
    an OpenMP pool spinning on every chunk cost 5x in wall time on a busy 2-core machine; the reader and
    writer threads use the other core instead. The previous thread count is restored afterwards.
    """
    chunk_elems = chunk_elems or CHUNK_ELEMS
    _keep_chunk_buffers()
    work = [
        (si, job, r0, r1) for si, sh in enumerate(shards) for job in sh.jobs for r0, r1 in _chunks(job, chunk_elems)
    ]
    writer = _Writer(out_dir, shards, progress) if out_dir is not None else None
    if writer:
        writer.start()
    ahead = READERS + 1
    reader = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="patchlab-reader")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    pending: dict[int, Future[tuple[bool, object]]] = {}

    def task(job: Job, r0: int, r1: int) -> tuple[bool, object]:
        inputs = job.load(r0, r1)
        if not job.parallel:
            return False, inputs
        out = job.compute(inputs, r0, r1)
        return True, out.to(dtype=job.dtype).to("cpu") if writer else out

    try:
        for i in range(len(work)):
            for k in range(i, min(i + ahead + 1, len(work))):
                if k not in pending:
                    pending[k] = reader.submit(task, work[k][1], work[k][2], work[k][3])
            nxt = i + ahead
            if nxt < len(work) and work[nxt][1].advise:
                work[nxt][1].advise(work[nxt][2], work[nxt][3])
            si, job, r0, r1 = work[i]
            done, value = pending.pop(i).result()
            out = value if done else job.compute(value, r0, r1)
            del value
            if writer:
                out = out.to(dtype=job.dtype).to("cpu")
                expect = (r1 - r0, *job.shape[1:]) if job.shape else ()
                writer.put((si, out.reshape(expect)))
            del out
            if r1 == job.rows and job.finish:
                job.finish()
    except BaseException:
        for f in pending.values():
            f.cancel()
        if writer:
            writer.put(_ABORT)
            writer.join()
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
    if writer:
        writer.put(_STOP)
        writer.join()
        if writer.error:
            raise writer.error


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output before any work is done."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another output or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; remove it first")


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` only if the block succeeds."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)
