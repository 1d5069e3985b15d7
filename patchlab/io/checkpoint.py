"""Hugging Face model directories, read lazily one tensor at a time.

A ``Checkpoint`` knows names, shapes and dtypes from the file headers alone, so opening even a 70B
checkpoint costs milliseconds and no memory. Data is read a row range at a time (``rows``, one positional
read into a buffer the caller may supply) or viewed zero-copy through a mapping (``tensor``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from patchlab.digests import BLAKE3, CONTENT_ALGORITHM, LEGACY, content_algorithm, make_digest
from patchlab.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedDtypeError
from patchlab.io.safetensors import MappedFile, read_into
from patchlab.names import EMBED_SUFFIXES

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
META_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)  # what a model directory has besides weights
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Fingerprint:
    """``architecture``: digest of names, shapes and dtypes. ``content``: digest of the tensor bytes."""

    architecture: str
    content: str


@dataclass(frozen=True)
class ContentScan:
    """What one read of every weight found: the content ``digest`` (of ``algorithm``) and, when checked,
    the floating-point tensors holding NaN/Inf (``nonfinite``, in file order)."""

    algorithm: str
    digest: str
    finite_checked: bool
    nonfinite: tuple[str, ...] = ()


class _BinFile:
    """A ``pytorch_model*.bin`` opened with ``torch.load(mmap=True, weights_only=True)``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a damaged pickle/zip
            raise CorruptCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from None
        if not isinstance(self.state, dict):
            raise CorruptCheckpointError(f"{path}: does not hold a state dict")

    def tensor(self, name: str) -> torch.Tensor:
        return self.state[name]

    def raw(self, name: str) -> memoryview:
        t = self.state[name].contiguous()
        return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")

    def advise(self, name: str, start_row: int, end_row: int) -> None:
        pass

    def release(self, name: str, start_row: int, end_row: int) -> None:
        pass

    def close(self) -> None:
        self.state = {}


class Checkpoint:
    """A Hugging Face model directory: config, tokenizer files and (sharded) weights."""

    def __init__(self, path: Path, weight_map: dict[str, str], files: dict[str, MappedFile | _BinFile]):
        self.path = path
        self.weight_map = weight_map  # tensor name -> file name, in file order
        self._files = files
        self._scans: dict[str, ContentScan] = {}  # by algorithm
        self._infos: dict[str, TensorInfo] = {}
        for name, fname in weight_map.items():
            f = files[fname]
            if isinstance(f, MappedFile):
                e = f.entries[name]
                self._infos[name] = TensorInfo(name, e.shape, e.dtype)
            else:
                t = f.state[name]
                self._infos[name] = TensorInfo(name, tuple(t.shape), t.dtype)

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | Checkpoint) -> Checkpoint:
        """Open a model directory. Raises ``CheckpointNotFoundError`` / ``CorruptCheckpointError``."""
        if isinstance(path, Checkpoint):
            return path
        path = Path(path)
        if not path.is_dir():
            what = "is a file, not a model directory" if path.exists() else "does not exist"
            raise CheckpointNotFoundError(f"{path} {what}; pass a Hugging Face model directory")
        if (path / SAFE_INDEX).exists():
            return cls._from_index(path, path / SAFE_INDEX, MappedFile)
        if (path / SAFE_SINGLE).exists():
            f = MappedFile(path / SAFE_SINGLE)
            return cls(path, {n: SAFE_SINGLE for n in _file_order(f)}, {SAFE_SINGLE: f})
        if (path / BIN_INDEX).exists():
            return cls._from_index(path, path / BIN_INDEX, _BinFile)
        if (path / BIN_SINGLE).exists():
            f = _BinFile(path / BIN_SINGLE)
            return cls(path, {n: BIN_SINGLE for n in f.state}, {BIN_SINGLE: f})
        raise CheckpointNotFoundError(
            f"{path} has no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
        )

    @classmethod
    def _from_index(cls, path: Path, index: Path, opener: type) -> Checkpoint:
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index}: not a valid index file ({e!r})") from None
        files: dict[str, MappedFile | _BinFile] = {}
        for fname in dict.fromkeys(wm.values()):
            fpath = path / fname
            if not fpath.exists():
                raise CheckpointNotFoundError(f"{index.name} lists shard {fname}, which is missing from {path}")
            files[fname] = opener(fpath)
        ordered: dict[str, str] = {}
        for fname, f in files.items():
            names = _file_order(f) if isinstance(f, MappedFile) else list(f.state)
            for n in names:
                if wm.get(n) == fname:
                    ordered[n] = fname
        missing = [n for n in wm if n not in ordered]
        if missing:
            raise CorruptCheckpointError(
                f"{index.name} maps {len(missing)} tensors to shards that do not hold them (e.g. {missing[0]!r})"
            )
        return cls(path, ordered, files)

    # -- metadata ------------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        p = self.path / "config.json"
        if not p.exists():
            return {}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CorruptCheckpointError(f"{p}: invalid JSON ({e})") from None

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def describe(self) -> dict:
        """Provenance of this checkpoint for a manifest (the content digest only when already computed)."""
        d = {
            "path": str(self.path.resolve()),
            "architecture": self.architecture_digest,
            "dtype": self.dtype,
            "vocab_size": self.vocab_size,
            "tied": self.tied,
            "parameters": self.num_parameters,
        }
        done = self._scans.get(CONTENT_ALGORITHM) or next(iter(self._scans.values()), None)
        if done is not None:  # hashing every byte is not free: never done just for this
            d["content"] = done.digest
        return d

    @cached_property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self._infos.values())

    @cached_property
    def dtype(self) -> str:
        """The dominant floating dtype by parameter count, e.g. ``"bfloat16"``."""
        c: Counter[torch.dtype] = Counter()
        for i in self._infos.values():
            if i.dtype.is_floating_point:
                c[i.dtype] += i.numel
        return str(c.most_common(1)[0][0]).removeprefix("torch.") if c else "none"

    @property
    def embed_name(self) -> str | None:
        return next((n for n in self._infos if n.endswith(EMBED_SUFFIXES)), None)

    @property
    def head_name(self) -> str | None:
        return next((n for n in self._infos if n.endswith(HEAD_SUFFIXES)), None)

    @cached_property
    def tied(self) -> bool:
        """Whether the output head shares the input embedding.

        The config decides when it says; a config that is silent counts as tied when the file stores no head.
        """
        cfg = self.config.get("text_config", self.config)
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
        return self.head_name is None and self.embed_name is not None

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        v = cfg.get("vocab_size")
        if v is None and self.embed_name:
            v = self._infos[self.embed_name].shape[0]
        return v

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).exists()]

    @cached_property
    def vocab(self) -> dict[str, int] | None:
        """Token string → id, from ``tokenizer.json`` (added tokens included); None without a tokenizer."""
        return load_vocab(self.path)

    # -- data ----------------------------------------------------------------------------------------
    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    @property
    def sharded(self) -> bool:
        return len(self._files) > 1 or (self.path / SAFE_INDEX).exists()

    def tensor(self, name: str) -> torch.Tensor:
        """A lazy, zero-copy tensor (slice it before converting to keep memory small)."""
        if name not in self._infos:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self._files[self.weight_map[name]].tensor(name)

    def rows(self, name: str, start_row: int, end_row: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start_row, end_row)`` of one tensor (all of a 0-d tensor), read into ``out`` when given.

        Without ``out`` the result may be a view of the file's data: do not modify it.
        """
        f = self._files[self.weight_map[name]]
        if isinstance(f, MappedFile):
            return f.rows(name, start_row, end_row, out)
        t = f.tensor(name)
        t = t[start_row:end_row] if t.dim() else t
        return t if out is None else out.copy_(t)

    def advise(self, name: str, start_row: int, end_row: int) -> None:
        self._files[self.weight_map[name]].advise(name, start_row, end_row)

    def release(self, name: str, start_row: int, end_row: int) -> None:
        """Tell the kernel these rows will not be read again soon (a hint; see :meth:`MappedFile.release`)."""
        self._files[self.weight_map[name]].release(name, start_row, end_row)

    def fingerprint(self) -> Fingerprint:
        """Digests of the architecture and of the tensor bytes (independent of sharding and metadata)."""
        return Fingerprint(self.architecture_digest, self.content_digest)

    @cached_property
    def architecture_digest(self) -> str:
        rows = sorted((n, list(i.shape), str(i.dtype)) for n, i in self._infos.items())
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    @property
    def content_digest(self) -> str:
        """The content digest of new fingerprints (``CONTENT_ALGORITHM``), computed once per checkpoint."""
        return self.scan(CONTENT_ALGORITHM, check_finite=False).digest

    def content_digest_like(self, recorded: str) -> str:
        """This checkpoint's content digest made with the algorithm of ``recorded`` (an older fingerprint is
        re-computed with its own algorithm, so it still verifies); ``UnknownDigestError`` for an unknown one."""
        return self.scan(content_algorithm(recorded), check_finite=False).digest

    def scan(self, algorithm: str = CONTENT_ALGORITHM, *, check_finite: bool = True) -> ContentScan:
        """Hash every tensor's bytes with ``algorithm`` and, with ``check_finite``, find NaN/Inf in the same read.

        Tensors are shared out to one worker thread per usable core (``PATCHLAB_WORKERS``), largest first;
        each reads its tensor a block at a time with ``pread`` into its own buffer, hashes the block and tests
        it for NaN/Inf while it is in cache (``kernels.delta.finite_exact``). The hashes release the GIL and
        torch runs single-threaded meanwhile. The result is kept: asking again costs nothing.
        """
        done = self._scans.get(algorithm)
        if done is not None and (done.finite_checked or not check_finite):
            return done
        per_tensor, bad = _scan_tensors(self.weight_map, self._files, self._infos, algorithm, check_finite)
        if algorithm == LEGACY:
            h = hashlib.sha256()
            for name in sorted(per_tensor):
                h.update(f"{name}\0{per_tensor[name]}\n".encode())
        else:
            h = _blake3()
            for name in sorted(per_tensor):
                i = self._infos[name]
                dtype = str(i.dtype).removeprefix("torch.")
                h.update(f"{name}\0{dtype}\0{','.join(map(str, i.shape))}\0{per_tensor[name]}\n".encode())
        order = {n: k for k, n in enumerate(self.weight_map)}
        done = ContentScan(
            algorithm, make_digest(algorithm, h.hexdigest()), check_finite, tuple(sorted(bad, key=order.__getitem__))
        )
        self._scans[algorithm] = done
        return done

    def weight_files(self) -> list[str]:
        """The files the weights are read from (shards, and the index when there is one)."""
        files = list(dict.fromkeys(self.weight_map.values()))
        for idx in (SAFE_INDEX, BIN_INDEX):
            if (self.path / idx).is_file():
                files.append(idx)
        return files

    def nonfinite(self, limit: int = 5) -> list[str]:
        """Names of (up to ``limit``) floating-point tensors holding NaN or Inf, in file order (one ``scan``)."""
        return list(self.scan(check_finite=True).nonfinite[:limit])

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self._infos)}, params={self.num_parameters:,})"


# The content algorithms (``patchlab.digests`` names them and tells them apart; docs/registry.md documents them):
#
# * ``blake3-of-sorted-tensor-blake3`` (``CONTENT_ALGORITHM``): every tensor's bytes (as stored: the
#   safetensors data range, or a ``.bin`` tensor's contiguous bytes) hashed with BLAKE3 (32 bytes, hex);
#   then one BLAKE3 over the UTF-8 lines ``name \0 dtype \0 shape \0 tensor-hex \n`` in sorted name order
#   (dtype as torch names it without ``torch.``, e.g. ``bfloat16``; shape as comma-separated sizes, empty
#   for a scalar). Recorded as ``blake3:`` + hex.
# * ``sha256-of-sorted-tensor-sha256`` (``LEGACY``, every fingerprint before it): the same with sha256 and
#   the lines ``name \0 tensor-hex \n``. Recorded as bare hex.
#
# Both are independent of sharding, file order, file format and metadata.
_HASH_BLOCK = 1 << 20  # bytes per pread: a block is hashed and tested while in L2 (a multiple of any itemsize)


def _blake3() -> Any:  # blake3.blake3 (no type stubs)
    from blake3 import blake3

    return blake3()


def _hasher(algorithm: str) -> Any:
    if algorithm == BLAKE3:
        return _blake3()
    if algorithm == LEGACY:
        return hashlib.sha256()
    raise ValueError(f"unknown content algorithm {algorithm!r}")


def _scan_tensors(
    weight_map: dict[str, str],
    files: dict[str, MappedFile | _BinFile],
    infos: dict[str, TensorInfo],
    algorithm: str,
    check_finite: bool,
) -> tuple[dict[str, str], list[str]]:
    """Hex digest of every tensor's bytes, and the floating tensors with NaN/Inf (when ``check_finite``)."""
    import concurrent.futures

    from patchlab.cores import worker_count
    from patchlab.kernels.delta import finite_exact

    _hasher(algorithm)  # an unknown algorithm fails here, not in a worker

    def one(name: str) -> tuple[str, bool]:
        f, info = files[weight_map[name]], infos[name]
        check = check_finite and info.dtype.is_floating_point
        h = _hasher(algorithm)
        if not isinstance(f, MappedFile):
            h.update(f.raw(name))
            return h.hexdigest(), not check or finite_exact(f.tensor(name))
        e = f.entries[name]
        buf = torch.empty(min(_HASH_BLOCK, e.end - e.start), dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd, pos, finite = f._fileno(), e.start, True
        while pos < e.end:
            n = min(len(view), e.end - pos)
            read_into(fd, view[:n], pos, f.path)
            h.update(view[:n])
            if check and finite:
                finite = finite_exact(buf[:n].view(info.dtype))
            pos += n
        return h.hexdigest(), finite

    def size(name: str) -> int:
        f = files[weight_map[name]]
        return f.entries[name].end - f.entries[name].start if isinstance(f, MappedFile) else 0

    names = sorted(weight_map, key=size, reverse=True)
    n = min(worker_count(), len(names)) or 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the finite tests are small and memory-bound: no OpenMP pool under the workers
    try:
        if n == 1:
            results = [one(name) for name in names]
        else:
            with concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="patchlab-hash") as pool:
                results = list(pool.map(one, names))
    finally:
        torch.set_num_threads(threads)
    per_tensor = {name: hx for name, (hx, _) in zip(names, results, strict=True)}
    bad = [name for name, (_, ok) in zip(names, results, strict=True) if not ok]
    return per_tensor, bad


def _file_order(f: MappedFile) -> list[str]:
    return sorted(f.entries, key=lambda n: f.entries[n].start)


def load_vocab(directory: Path) -> dict[str, int] | None:
    """Token → id of the tokenizer in ``directory`` (tokenizer.json, else transformers), or None."""
    tj = directory / "tokenizer.json"
    if tj.exists():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True)
        except Exception as e:
            raise CorruptCheckpointError(f"{tj}: cannot be read by the tokenizers library ({e})") from None
    if any((directory / n).exists() for n in ("tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(str(directory)).get_vocab())
    return None


def check_dtype(t: TensorInfo) -> None:
    if t.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16) and t.dtype.is_floating_point:
        raise UnsupportedDtypeError(
            f"tensor {t.name!r} is {t.dtype}; patchlab computes deltas for fp64/fp32/fp16/bf16 only"
        )


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name (``"bfloat16"``, ``"torch.float16"``); None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    d = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise UnsupportedDtypeError(f"unknown dtype {name!r}; use e.g. float32, bfloat16 or float16")
    return d


def copy_files(src: Path, dst: Path, names: Iterable[str] = META_FILES) -> None:
    """Copy those of ``names`` that exist in ``src`` into ``dst`` (config, tokenizer and template files)."""
    for n in names:
        if (src / n).is_file():
            shutil.copy2(src / n, dst / n)
