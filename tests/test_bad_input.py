"""Each kind of bad input gets a specific exception that says what and where, and leaves no output."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import patchlab
from patchlab.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DeviceError,
    NonFiniteDeltaError,
    OutputExistsError,
    PatchFormatError,
    PlanError,
    UnsupportedDtypeError,
)
from tests.conftest import no_partial_dirs
from tests.factory import make_model, state


@pytest.fixture
def pair(tmp_path):
    base = make_model(tmp_path / "base")
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.02, seed=1)
    return base, ft


def assert_clean(tmp_path, out):
    assert not out.exists()
    assert not no_partial_dirs(out.parent)


def test_missing_directory_and_weights(tmp_path, pair):
    base, ft = pair
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        patchlab.extract(tmp_path / "nope", ft, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        patchlab.extract(tmp_path / "empty", ft, tmp_path / "out")
    assert_clean(tmp_path, tmp_path / "out")


def test_missing_shard(tmp_path):
    base = make_model(tmp_path / "base", shard_size="20KB")
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.02, seed=1, shard_size="20KB")
    (ft / "model-00002-of-00006.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00006.safetensors"):
        patchlab.extract(base, ft, tmp_path / "out")
    assert_clean(tmp_path, tmp_path / "out")


def test_truncated_safetensors(tmp_path, pair):
    base, ft = pair
    f = ft / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        patchlab.extract(base, ft, tmp_path / "out")
    f.write_bytes(data[:20])
    with pytest.raises(CorruptCheckpointError, match="truncated|not safetensors"):
        patchlab.extract(base, ft, tmp_path / "out")
    assert_clean(tmp_path, tmp_path / "out")


def test_corrupt_header(tmp_path, pair):
    base, ft = pair
    f = ft / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:14] = b"\xff\xfe{{"
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="header"):
        patchlab.extract(base, ft, tmp_path / "out")


def test_unknown_dtype(tmp_path, pair):
    base, ft = pair
    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    (ft / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(UnsupportedDtypeError, match="F4"):
        patchlab.extract(base, ft, tmp_path / "out")
    with pytest.raises(PlanError, match="storage dtype"):
        patchlab.extract(base, base, tmp_path / "out", storage_dtype="int8")
    assert_clean(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_delta(tmp_path, pair, bad):
    base, ft = pair
    sd = state(ft)
    sd["model.layers.1.mlp.down_proj.weight"][3, 4] = bad
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteDeltaError, match="model.layers.1.mlp.down_proj.weight"):
        patchlab.extract(base, ft, tmp_path / "out")
    assert_clean(tmp_path, tmp_path / "out")
    with pytest.raises(NonFiniteDeltaError):
        patchlab.port_fused(ft, base, base, tmp_path / "out")
    assert_clean(tmp_path, tmp_path / "out")


def test_existing_output(tmp_path, pair):
    base, ft = pair
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        patchlab.extract(base, ft, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what patchlab wrote: a directory of the user's own is refused (issue 10)
    with pytest.raises(OutputExistsError, match="did not write it"):
        patchlab.extract(base, ft, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    p = patchlab.extract(base, ft, tmp_path / "out2")
    p = patchlab.extract(base, ft, tmp_path / "out2", overwrite=True)
    assert p.path.is_dir() and not no_partial_dirs(tmp_path)


def test_damaged_patch(tmp_path, pair):
    base, ft = pair
    p = patchlab.extract(base, ft, tmp_path / "patch")
    m = json.loads((p.path / "patch.json").read_text())
    m["format_version"] = 99
    (p.path / "patch.json").write_text(json.dumps(m))
    with pytest.raises(PatchFormatError, match="newer"):
        patchlab.apply(tmp_path / "patch", base, tmp_path / "out")
    m["format_version"] = 1
    (p.path / "patch.json").write_text(json.dumps(m))
    (p.path / "delta-00001-of-00001.safetensors").unlink()
    with pytest.raises(PatchFormatError, match="missing"):
        patchlab.apply(tmp_path / "patch", base, tmp_path / "out")
    with pytest.raises(PatchFormatError, match="patchlab diff"):
        patchlab.apply(tmp_path / "nothing", base, tmp_path / "out")
    assert_clean(tmp_path, tmp_path / "out")


def test_cuda_requested_without_cuda(tmp_path, pair):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base, ft = pair
    with pytest.raises(DeviceError, match="--device cpu"):
        patchlab.extract(base, ft, tmp_path / "out", device="cuda")
    assert_clean(tmp_path, tmp_path / "out")


def test_error_midway_leaves_nothing(tmp_path, pair, monkeypatch):
    """A failure after some shards were written (a crash, a full disk) removes the temporary directory."""
    base, ft = pair
    import patchlab.io.safetensors as sio

    calls = {"n": 0}
    real = sio.ShardWriter.write

    def flaky(self, name, offset, chunk):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("No space left on device")
        return real(self, name, offset, chunk)

    monkeypatch.setattr(sio.ShardWriter, "write", flaky)
    with pytest.raises(OSError, match="No space"):
        patchlab.extract(base, ft, tmp_path / "out")
    assert_clean(tmp_path, tmp_path / "out")


def test_output_larger_than_free_space_is_refused_before_writing(tmp_path, pair, monkeypatch):
    import shutil as _shutil

    import patchlab.engine.executor as eng
    from patchlab.errors import NoSpaceError

    base, ft = pair
    real = _shutil.disk_usage
    monkeypatch.setattr(eng.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(NoSpaceError, match="GB free; free some space"):
        patchlab.extract(base, ft, tmp_path / "out")
    assert_clean(tmp_path, tmp_path / "out")
