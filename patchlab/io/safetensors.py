"""Low-level safetensors file access: header parsing, row reads, zero-copy views, and a chunked writer.

The ``safetensors`` package reads a tensor by copying it whole into process memory and writes a file only
from tensors that are all in memory at once. Streaming a multi-gigabyte shard needs neither: we parse the
(tiny, documented) header ourselves, read any row range with one positional read (or view a whole tensor
zero-copy through a mapping), and write a shard whose header is known in advance chunk by chunk, each at
its fixed position. Positional I/O (``os.preadv``/``os.pwrite``) needs a POSIX system. Files stay
byte-compatible with the library, which the tests check by reading our output with ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from patchlab.errors import CorruptCheckpointError, UnsupportedDtypeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
_OPEN_LOCK = threading.Lock()


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` → ``"BF16"``)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise UnsupportedDtypeError(f"dtype {dtype} cannot be stored in safetensors; cast it first") from None


@dataclass(frozen=True)
class Entry:
    """One tensor's place in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Parse and validate a safetensors header: entries by name, and the ``__metadata__`` dict.

    Detects truncated files, overlapping or out-of-range offsets, and unknown dtypes without reading data.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path}: file is {size} bytes, too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise CorruptCheckpointError(
                f"{path}: header claims {n} bytes but the file has {size}; the file is truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e}); re-download the file") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, Entry] = {}
    for name, h in header.items():
        try:
            code, shape, (s, e) = h["dtype"], tuple(int(x) for x in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: malformed header entry for {name!r}") from None
        if code not in DTYPES:
            raise UnsupportedDtypeError(f"{path}: tensor {name!r} has dtype {code}, which patchlab cannot read")
        dtype = DTYPES[code]
        want = math.prod(shape) * dtype.itemsize
        if e - s != want or s < 0:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} spans {e - s} bytes but shape {list(shape)} {code} needs {want}"
            )
        entries[name] = Entry(name, dtype, shape, data_start + s, data_start + e)
    end = max((x.end for x in entries.values()), default=data_start)
    if end > size:
        raise CorruptCheckpointError(
            f"{path}: file is truncated ({size} bytes, tensors need {end}); re-download or re-create it"
        )
    return entries, metadata


ADVISE_WINDOW = 32 << 20  # bytes asked ahead per posix_fadvise(WILLNEED)


class MappedFile:
    """A read-only safetensors file: row ranges read with ``preadv``, whole tensors as zero-copy mapped views."""

    def __init__(self, path: Path):
        self.path = path
        self.entries, self.metadata = read_header(path)
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._advised = (0, 0)  # byte range last advised (see advise)
        self._size = path.stat().st_size

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with _OPEN_LOCK, open(self.path, "rb") as f:  # workers may ask at once: map the file once
                if self._mm is None:
                    # ACCESS_COPY gives a writable (copy-on-write) buffer, so torch.frombuffer does not warn;
                    # nothing ever writes to it, so pages stay file-backed and are not process memory.
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e.numel == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        t = torch.frombuffer(self._map(), dtype=e.dtype, count=e.numel, offset=e.start)
        return t.view(e.shape)

    def rows(self, name: str, start_row: int, end_row: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start_row, end_row)`` read with one positional read, into ``out`` if given (a contiguous
        CPU tensor of the rows' shape and dtype), else into a fresh tensor.

        A copy, not a view of the mapping: reading through a populated mapping cost more in page-table
        work (mapping every 4 KiB page, then tearing it down at exit) than the copy it saves, and left the
        process holding gigabytes of mapped pages. The buffer is the caller's to modify.
        """
        e = self.entries[name]
        if not e.shape:
            return self.tensor(name).clone() if out is None else out.copy_(self.tensor(name))
        end_row = max(start_row, min(end_row, e.shape[0]))
        want = (end_row - start_row, *e.shape[1:])
        if out is None:
            out = torch.empty(want, dtype=e.dtype)
        elif tuple(out.shape) != want or out.dtype != e.dtype or not out.is_contiguous():
            raise ValueError(f"rows of {name}: buffer is {tuple(out.shape)} {out.dtype}, need {want} {e.dtype}")
        if out.numel():
            row = e.numel // e.shape[0] * e.dtype.itemsize
            read_into(self._fileno(), tensor_bytes(out), e.start + start_row * row, self.path)
        return out

    def _fileno(self) -> int:
        if self._fd is None:
            with _OPEN_LOCK:  # workers may ask at once: open one descriptor, not one each
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self._fd

    def raw(self, name: str) -> memoryview:
        """The bytes of one tensor, zero-copy."""
        e = self.entries[name]
        if e.numel == 0:
            return memoryview(b"")
        return memoryview(self._map())[e.start : e.end]

    def advise(self, name: str, start_row: int, end_row: int) -> None:
        """Ask the kernel to start reading rows ahead (best effort; a no-op where unsupported)."""
        e = self.entries[name]
        if not e.shape or e.numel == 0 or not hasattr(os, "posix_fadvise"):
            return
        row = e.numel // e.shape[0] * e.dtype.itemsize
        a = e.start + start_row * row
        b = min(e.end, e.start + end_row * row)
        if b <= a:
            return
        # One WILLNEED costs ~0.4 ms even on cached pages: rather than once a chunk, advise ADVISE_WINDOW
        # bytes at a time, whenever a request reaches past what was already advised (reads are sequential)
        lo, hi = self._advised
        if lo <= a and b <= hi:
            return
        hi = min(max(b, a + ADVISE_WINDOW), self._size)
        self._advised = (a, hi)
        os.posix_fadvise(self._fileno(), a, hi - a, os.POSIX_FADV_WILLNEED)

    def release(self, name: str, start_row: int, end_row: int) -> None:
        """Let the kernel drop these rows from the page cache (``POSIX_FADV_DONTNEED``): a once-read input (the
        old base of an upgrade's drift pass) then does not push out what the rest of the run reads again."""
        e = self.entries[name]
        if not e.shape or e.numel == 0 or not hasattr(os, "posix_fadvise"):
            return
        row = e.numel // e.shape[0] * e.dtype.itemsize
        a, b = e.start + start_row * row, min(e.end, e.start + end_row * row)
        if b > a:
            os.posix_fadvise(self._fileno(), a, b - a, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a tensor view is still alive; the map closes when it is collected
                pass
            self._mm = None


@dataclass(frozen=True)
class TensorSpec:
    """What a streaming writer will receive for one tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def build_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The header bytes (length prefix included) of a file holding ``specs`` in this order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": dtype_code(s.dtype),
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes: zero-copy for a contiguous CPU tensor, else of a contiguous CPU copy."""
    if t.requires_grad or t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def read_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (positional: threads may share the descriptor)."""
    done, n = 0, buf.nbytes
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise CorruptCheckpointError(f"{path}: file ended at byte {offset + done}; it was truncated while open")
        done += got


class ShardWriter:
    """One safetensors file, written in row chunks at known positions, from any number of threads.

    The header is written first from the specs and the file is sized to its final length, so every chunk
    has a fixed place: writers need no ordering and nothing but the chunk in hand is held in memory.
    ``finish`` checks that every byte promised by the header arrived.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = path
        header = build_header(specs, metadata)
        self._offsets: dict[str, int] = {}
        pos = len(header)
        for sp in specs:
            self._offsets[sp.name] = pos
            pos += sp.nbytes
        self._expected = pos - len(header)
        self._written = 0
        self._lock = threading.Lock()
        self._wlock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
        try:
            self._pwrite(memoryview(header), 0)
            os.ftruncate(self._fd, pos)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, byte_offset: int, chunk: torch.Tensor | memoryview | bytes) -> int:
        """Write ``chunk`` at ``byte_offset`` within tensor ``name``; returns the bytes written."""
        data = memoryview(tensor_bytes(chunk) if isinstance(chunk, torch.Tensor) else chunk).cast("B")
        with self._wlock:  # the kernel serialises buffered writes to one file anyway, spinning while it waits
            self._pwrite(data, self._offsets[name] + byte_offset)
        with self._lock:
            self._written += data.nbytes
        return data.nbytes

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < data.nbytes:
            done += os.pwrite(self._fd, data[done:], offset + done)

    def finish(self) -> None:
        os.close(self._fd)
        self._fd = -1
        if self._written != self._expected:
            raise CorruptCheckpointError(
                f"{self.path}: wrote {self._written} data bytes, header promised {self._expected} (internal error)"
            )

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
