"""extract → apply reproduces the fine-tune bit for bit; outputs are real, loadable HF directories."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import patchlab
from patchlab.kernels.delta import bits
from tests.factory import make_model, state


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].is_floating_point():
            assert torch.equal(bits(a[k]), bits(b[k])), k
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_extract_apply_is_bit_exact(tmp_path, dtype, shard):
    base = make_model(tmp_path / "base", dtype=dtype, shard_size=shard)
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.01, dtype=dtype, seed=1)
    patch = patchlab.extract(base, ft, tmp_path / "patch")
    out = patchlab.apply(patch, base, tmp_path / "out")
    assert_bitwise_equal(state(ft), state(out.path))
    # sharded like the target, with an index the safetensors library agrees with
    assert sorted(p.name for p in out.path.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    if shard:
        wm = json.loads((out.path / "model.safetensors.index.json").read_text())["weight_map"]
        for name, f in wm.items():
            with safe_open(str(out.path / f), "pt") as fh:
                assert name in fh.keys()


def test_residuals_make_signed_zeros_exact(tmp_path):
    """fp16 -0.0 and wide exponent gaps are not reproduced by base + Δ; the stored residuals fix them."""
    base = make_model(tmp_path / "base", dtype=torch.float16)
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.01, dtype=torch.float16, seed=1)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ft / "model.safetensors"))
    w = sd["model.layers.0.mlp.down_proj.weight"]
    w.view(-1)[:5] = -0.0
    w.view(-1)[5] = 6e-8  # subnormal: base − ft loses it in a wide exponent gap
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    patch = patchlab.extract(base, ft, tmp_path / "patch")
    assert patch.manifest["totals"]["fixups"] >= 5
    out = patchlab.apply(patch, base, tmp_path / "out")
    assert_bitwise_equal(state(ft), state(out.path))
    # residuals belong to that exact base: with α ≠ 1 they are not written
    half = patchlab.apply(patch, base, tmp_path / "half", alpha=0.5)
    assert not torch.equal(
        bits(state(half.path)["model.layers.0.mlp.down_proj.weight"]).view(-1)[:5], bits(w.view(-1)[:5])
    )


def test_native_storage_halves_patch_and_stays_exact(tmp_path):
    """A bf16 model's Δ is stored in bf16 by default: half an fp32 Δ, still exact through residuals."""
    base = make_model(tmp_path / "base", dtype=torch.bfloat16)
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.01, dtype=torch.bfloat16, seed=1)
    wide = patchlab.extract(base, ft, tmp_path / "p32", storage_dtype="float32")
    native = patchlab.extract(base, ft, tmp_path / "p16")
    size = lambda p: sum(f.stat().st_size for f in p.path.glob("delta-*"))  # noqa: E731
    assert size(native) < 0.55 * size(wide)
    params = native.manifest["provenance"]["parameters"]
    assert params["exact"] is True and params["storage_dtype"] == "finetune"
    e = native.entry("model.layers.1.self_attn.q_proj.weight")
    assert e.stored_dtype("delta") == torch.bfloat16
    assert_bitwise_equal(state(ft), state(patchlab.apply(native, base, tmp_path / "out").path))
    # the stored Δ is ft − base rounded once to bf16; its statistics are those of the exact Δ
    exact = state(ft)[e.name].float() - state(base)[e.name].float()
    assert torch.equal(e.dense(), exact.to(torch.bfloat16).float())
    assert e.stats == wide.entry(e.name).stats


def test_lossy_storage_halves_patch(tmp_path):
    """A storage dtype narrower than the fine-tune's halves the patch and gives up exactness."""
    base = make_model(tmp_path / "base")
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.01, seed=1)
    exact = patchlab.extract(base, ft, tmp_path / "p32")
    small = patchlab.extract(base, ft, tmp_path / "p16", storage_dtype="bfloat16")
    size = lambda p: sum(f.stat().st_size for f in p.path.glob("delta-*"))  # noqa: E731
    assert size(small) < 0.55 * size(exact)
    assert small.manifest["provenance"]["parameters"]["exact"] is False
    assert exact.manifest["provenance"]["parameters"]["exact"] is True


def _edge_values(dtype: torch.dtype) -> tuple[list[float], list[float]]:
    """(base, ft) pairs that rounding Δ to ``dtype`` gets wrong: signed zeros, the dtype's largest values (Δ
    past its range), subnormals, wide exponent gaps, and ordinary values."""
    fi = torch.finfo(dtype)
    big, tiny, sub = fi.max, fi.tiny, fi.smallest_normal / 8
    if dtype == torch.bfloat16:  # bf16's range is fp32's: a Δ past it but still finite in fp32
        a, b = 2.0**127, 2.0**126 * 1.9921875
        wide = [(-b, a), (a, -b)]
    else:
        wide = [(-big, big), (big, -big)]
    pairs = [
        (0.0, -0.0), (-0.0, 0.0), (-0.0, -0.0), (0.0, 0.0),
        *wide, (big, 0.0), (0.0, -big), (big, big / 2),
        (sub, -sub), (tiny, -tiny), (sub, 1.0), (1.0, sub),
        (1e3 if dtype == torch.float16 else 1e30, 3e-3), (3e-3, -7.0), (0.5, 0.5001), (-1.25, 1.0),
    ]
    return [float(b) for b, _ in pairs], [float(f) for _, f in pairs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_storage_is_exact_on_edge_values(tmp_path, dtype):
    from safetensors.torch import save_file

    base = make_model(tmp_path / "base", dtype=dtype)
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.01, dtype=dtype, seed=1)
    name = "model.layers.0.mlp.down_proj.weight"
    b_vals, f_vals = _edge_values(dtype)
    for d, vals in ((base, b_vals), (ft, f_vals)):
        f = next(p for p in d.glob("*.safetensors"))
        sd = state(d)
        t = sd[name].reshape(-1).clone()
        t[: len(vals)] = torch.tensor(vals, dtype=dtype)
        sd[name] = t.reshape(sd[name].shape)
        save_file(sd, str(f), metadata={"format": "pt"})
    patch = patchlab.extract(base, ft, tmp_path / "patch")
    e = patch.entry(name)
    assert e.stored_dtype("delta") == dtype and e.fix and e.fix["count"] >= 3  # signed zeros at least
    d = e.dense()
    assert bool(torch.isfinite(d).all())  # differences past the dtype's range are clamped, not inf
    assert_bitwise_equal(state(ft), state(patchlab.apply(patch, base, tmp_path / "out").path))
    wide = patchlab.extract(base, ft, tmp_path / "p32", storage_dtype="float32")
    assert_bitwise_equal(state(ft), state(patchlab.apply(wide, base, tmp_path / "out32").path))


def test_patch_manifest_records_provenance_and_stats(tmp_path):
    base = make_model(tmp_path / "base")
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.01, seed=1)
    p = patchlab.extract(base, ft, tmp_path / "patch")
    m = p.manifest
    assert m["format"] == "patchlab.io.patch" and m["format_version"] == 1
    prov = m["provenance"]
    assert prov["base"]["architecture"] == patchlab.Checkpoint.open(base).architecture_digest
    assert prov["finetuned"]["path"].endswith("ft") and prov["method"] == "extract"
    e = p.entry("model.layers.1.self_attn.q_proj.weight")
    delta = (state(ft)[e.name] - state(base)[e.name]).float()
    assert e.stats["norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
    assert e.stats["rel_norm"] == pytest.approx(float(delta.norm() / state(base)[e.name].norm()), rel=1e-5)
    assert e.stats["max_abs"] == pytest.approx(float(delta.abs().max()), rel=1e-6)
    assert e.stats["changed_frac"] == pytest.approx(float((delta != 0).float().mean()), rel=1e-6)
    assert torch.equal(e.dense(), delta)
    assert (p.path / "finetune" / "config.json").exists() and (p.path / "finetune" / "tokenizer.json").exists()


def test_port_output_loads_and_matches_manual_sum(tmp_path):
    src = make_model(tmp_path / "src")
    ft = make_model(tmp_path / "ft", from_model=src, noise=0.02, seed=1, chat_template="{{ messages }}")
    (ft / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "max_new_tokens": 7}))
    tgt = make_model(tmp_path / "tgt", from_model=src, noise=0.01, seed=2)
    patch = patchlab.extract(src, ft, tmp_path / "patch")
    out = patchlab.port(patch, tgt, tmp_path / "ported")
    s_src, s_ft, s_tgt, s_out = state(src), state(ft), state(tgt), state(out.path)
    for k in s_out:
        want = (s_tgt[k].float() + (s_ft[k].float() - s_src[k].float())).to(s_tgt[k].dtype)
        assert torch.equal(s_out[k], want), k
    model = AutoModelForCausalLM.from_pretrained(str(out.path))
    assert model(torch.tensor([[0, 5, 6]])).logits.shape[-1] == 63
    # config/tokenizer from the target; chat template and generation config from the fine-tune
    assert json.loads((out.path / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert json.loads((out.path / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"
    assert json.loads((out.path / "patchlab.json").read_text())["operation"] == "port"


@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_fused_port_equals_two_step_port(tmp_path, alpha):
    """From an fp32 Δ both paths compute ``target + (α·Δ)`` in one order, so they agree bit for bit at any α;
    from the default bf16 Δ (Δ rounded once to bf16: half an ulp of Δ, then the result's own rounding) they
    agree within an ulp of Δ plus one of the result, and bit for bit wherever the target holds the source
    base's value (residuals)."""
    src = make_model(tmp_path / "src", dtype=torch.bfloat16)
    ft = make_model(tmp_path / "ft", from_model=src, noise=0.02, seed=1, dtype=torch.bfloat16)
    tgt = make_model(tmp_path / "tgt", from_model=src, noise=0.01, seed=2, dtype=torch.bfloat16)
    wide = patchlab.extract(src, ft, tmp_path / "patch", storage_dtype="float32")
    two = patchlab.port(wide, tgt, tmp_path / "two", alpha=alpha)
    fused = patchlab.port_fused(ft, src, tgt, tmp_path / "fused", alpha=alpha)
    assert_bitwise_equal(state(two.path), state(fused.path))
    assert not (tmp_path / "fused" / "delta-00001-of-00001.safetensors").exists()
    native = patchlab.port(patchlab.extract(src, ft, tmp_path / "p16"), tgt, tmp_path / "two16", alpha=alpha)
    got, want, t, s, f = state(native.path), state(fused.path), state(tgt), state(src), state(ft)
    for k in want:
        if not want[k].is_floating_point():
            continue
        g, w = got[k].float(), want[k].float()
        bound = (alpha * (f[k].float() - s[k].float()).abs() + torch.maximum(g.abs(), w.abs())) * 2.0**-7
        assert bool(((g - w).abs() <= bound).all()), k
        if alpha == 1.0:  # where the target is the source base, residuals make it the fused value exactly
            same = bits(t[k]) == bits(s[k])
            assert torch.equal(bits(got[k])[same], bits(want[k])[same]), k


def test_alpha_and_alpha_by_pattern(tmp_path):
    src = make_model(tmp_path / "src")
    ft = make_model(tmp_path / "ft", from_model=src, noise=0.02, seed=1)
    patch = patchlab.extract(src, ft, tmp_path / "patch")
    zero = patchlab.apply(patch, src, tmp_path / "zero", alpha=0.0)
    assert_bitwise_equal(state(src), state(zero.path))
    mixed = patchlab.apply(patch, src, tmp_path / "mixed", alpha=1.0, alpha_by_pattern={"*.mlp.*": 0.5})
    s_src, s_ft, s_out = state(src), state(ft), state(mixed.path)
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(s_out[k], s_src[k] + 0.5 * (s_ft[k] - s_src[k]), atol=1e-7)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(s_out[k], s_ft[k])


def test_bin_checkpoints_are_read_lazily(tmp_path):
    base = make_model(tmp_path / "base")
    import shutil

    # transformers 5 only writes safetensors; older Hub checkpoints ship pytorch_model.bin like this one
    (tmp_path / "bin").mkdir()
    shutil.copy(base / "config.json", tmp_path / "bin" / "config.json")
    torch.save(state(base), tmp_path / "bin" / "pytorch_model.bin")
    ck = patchlab.Checkpoint.open(tmp_path / "bin")
    assert ck.weight_map and all(f.endswith(".bin") for f in ck.weight_map.values())
    ref = patchlab.Checkpoint.open(base)
    assert ck.fingerprint().architecture == ref.fingerprint().architecture
    assert ck.fingerprint().content == ref.fingerprint().content  # sharding and format do not change content


def test_fingerprints(tmp_path):
    a = make_model(tmp_path / "a")
    b = make_model(tmp_path / "b", from_model=a, noise=0.01, seed=3)
    c = make_model(tmp_path / "c", from_model=a, noise=0.0, shard_size="20KB")
    fa, fb, fc = (patchlab.Checkpoint.open(p).fingerprint() for p in (a, b, c))
    assert fa.architecture == fb.architecture == fc.architecture
    assert fa.content != fb.content
    assert fa.content == fc.content


def test_fixups_are_written_in_bounded_shards(tmp_path, monkeypatch):
    """Residuals go to disk every FIXUP_BUFFER_BYTES (memory stays bounded); the round trip stays exact."""
    import patchlab.io.patch as patch_io

    monkeypatch.setattr(patch_io, "FIXUP_BUFFER_BYTES", 256)
    base = make_model(tmp_path / "base", dtype=torch.bfloat16)
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.01, dtype=torch.bfloat16, seed=1)
    patch = patchlab.extract(base, ft, tmp_path / "patch")
    files = sorted(p.name for p in patch.path.glob("fixups*.safetensors"))
    assert len(files) > 1 and files[0] == f"fixups-00001-of-{len(files):05d}.safetensors"
    fixed = [e for e in patch.entries() if e.fix]
    assert {e.fix["file"] for e in fixed} == set(files)
    assert patch.manifest["totals"]["fixups"] == sum(e.fix["count"] for e in fixed)
    assert_bitwise_equal(state(ft), state(patchlab.apply(patch, base, tmp_path / "out").path))
