"""Plans reconcile vocabularies, tied embeddings, one-sided keys and integer buffers before any write."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import patchlab
from patchlab.errors import IncompatiblePatchError, PlanError
from tests.conftest import no_partial_dirs
from tests.factory import WORDS, make_model, state

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def grown(tmp_path, src, name, words, seed=5):
    """A newer base whose tokenizer has ``words`` (old words may move) and matching embedding rows."""
    path = make_model(tmp_path / name, words=words, seed=seed)
    old, new = state(src), load_file(str(path / "model.safetensors"))
    for k, v in old.items():  # keep the family close: copy old weights, rows by token string
        if k in (EMB, HEAD):
            continue
        new[k] = v + 0.001 * torch.randn_like(v)
    vs = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    vt = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    for k in (EMB, HEAD):
        for tok, j in vt.items():
            if tok in vs:
                new[k][j] = old[k][vs[tok]]
    save_file(new, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture
def family(tmp_path):
    src = make_model(tmp_path / "src")
    ft = make_model(tmp_path / "ft", from_model=src, noise=0.02, seed=1)
    patch = patchlab.extract(src, ft, tmp_path / "patch")
    return src, ft, patch


def test_grown_vocabulary_needs_an_explicit_policy(tmp_path, family):
    src, ft, patch = family
    tgt = grown(tmp_path, src, "v2", WORDS + ["new1", "new2"])
    with pytest.raises(PlanError, match="vocab-policy") as e:
        patchlab.port(patch, tgt, tmp_path / "out")
    assert EMB in str(e.value) and HEAD in str(e.value)
    assert not (tmp_path / "out").exists() and not no_partial_dirs(tmp_path)


@pytest.mark.parametrize("policy", ["pad-zero", "truncate", "by-token"])
def test_grown_vocabulary_policies(tmp_path, family, policy):
    src, ft, patch = family
    tgt = grown(tmp_path, src, "v2", WORDS + ["new1", "new2"])
    out = patchlab.port(patch, tgt, tmp_path / "out", vocab_policy=policy)
    s_src, s_ft, s_tgt, s_out = state(src), state(ft), state(tgt), state(out.path)
    n = s_src[EMB].shape[0]
    assert s_out[EMB].shape == s_tgt[EMB].shape
    d = s_ft[EMB] - s_src[EMB]
    assert torch.allclose(s_out[EMB][:n], s_tgt[EMB][:n] + d, atol=1e-6)
    assert torch.equal(s_out[EMB][n:], s_tgt[EMB][n:])  # new tokens keep the target's rows


def test_by_token_follows_moved_ids(tmp_path, family):
    src, ft, patch = family
    words = list(reversed(WORDS)) + ["new1"]  # every id moves
    tgt = grown(tmp_path, src, "v2", words)
    with pytest.raises(PlanError, match="by-token"):
        patchlab.port(patch, tgt, tmp_path / "x", vocab_policy=None)
    out = patchlab.port(patch, tgt, tmp_path / "out", vocab_policy="by-token")
    s_src, s_ft, s_tgt, s_out = state(src), state(ft), state(tgt), state(out.path)
    vs = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    vt = json.loads((tgt / "tokenizer.json").read_text())["model"]["vocab"]
    for tok in ("w0", "w17", "</s>"):
        i, j = vs[tok], vt[tok]
        assert torch.allclose(s_out[EMB][j], s_tgt[EMB][j] + s_ft[EMB][i] - s_src[EMB][i], atol=1e-6), tok
    assert torch.equal(s_out[EMB][vt["new1"]], s_tgt[EMB][vt["new1"]])


def test_skip_embeddings_keeps_target_rows(tmp_path, family):
    src, ft, patch = family
    tgt = grown(tmp_path, src, "v2", WORDS + ["new1"])
    out = patchlab.port(patch, tgt, tmp_path / "out", vocab_policy="skip-embeddings")
    assert torch.equal(state(out.path)[EMB], state(tgt)[EMB])
    plan = patchlab.port(patch, tgt, tmp_path / "dry", vocab_policy="skip-embeddings", dry_run=True)
    assert any("skip-embeddings" in u[1] for u in plan.unused) and not (tmp_path / "dry").exists()


def test_finetune_that_adds_a_token_round_trips_with_pad_zero(tmp_path):
    base = make_model(tmp_path / "base")
    ft = grown(tmp_path, base, "ft", WORDS + ["<pad>"])
    with pytest.raises(PlanError, match="pad-zero"):
        patchlab.extract(base, ft, tmp_path / "p0")
    patch = patchlab.extract(base, ft, tmp_path / "patch", vocab_policy="pad-zero")
    out = patchlab.apply(patch, base, tmp_path / "out", vocab_policy="pad-zero")
    s_ft, s_out = state(ft), state(out.path)
    for k in s_ft:
        assert torch.equal(s_ft[k], s_out[k]), k
    cfg = json.loads((out.path / "config.json").read_text())
    assert cfg["vocab_size"] == s_ft[EMB].shape[0]
    assert "<pad>" in (out.path / "tokenizer.json").read_text()  # rows the target's tokenizer lacks: ft's tokenizer


def test_tied_family(tmp_path):
    src = make_model(tmp_path / "src", tied=True)
    ft = make_model(tmp_path / "ft", from_model=src, noise=0.02, seed=1)
    tgt = make_model(tmp_path / "tgt", from_model=src, noise=0.01, seed=2)
    assert HEAD not in state(src)
    patch = patchlab.extract(src, ft, tmp_path / "patch")
    assert HEAD not in patch.names
    out = patchlab.port(patch, tgt, tmp_path / "out")
    assert HEAD not in state(out.path)
    assert patchlab.Checkpoint.open(out.path).tied


def test_tied_config_that_also_stores_lm_head_is_written_once(tmp_path, family):
    src, ft, patch = family
    tgt = make_model(tmp_path / "tgt", from_model=src, noise=0.01, seed=2)
    sd = load_file(str(tgt / "model.safetensors"))
    sd[HEAD] = sd[EMB].clone()
    save_file(sd, str(tgt / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tgt / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tgt / "config.json").write_text(json.dumps(cfg))
    out = patchlab.port(patch, tgt, tmp_path / "out", force=True)  # the untied lm_head delta cannot apply
    assert HEAD not in state(out.path)
    with pytest.raises(PlanError, match="--force"):  # without force: a visible share of the patch is skipped
        patchlab.port(patch, tgt, tmp_path / "out2")


def test_tied_source_onto_untied_target_applies_embedding_delta_to_head(tmp_path):
    src = make_model(tmp_path / "src", tied=True)
    ft = make_model(tmp_path / "ft", from_model=src, noise=0.02, seed=1)
    tgt = make_model(tmp_path / "tgt", seed=4)
    sd = state(tgt)
    for k, v in state(src).items():
        sd[k] = v.clone()
    sd[HEAD] = sd[EMB].clone() + 0.01
    save_file(sd, str(tgt / "model.safetensors"), metadata={"format": "pt"})
    out = patchlab.port(patchlab.extract(src, ft, tmp_path / "p"), tgt, tmp_path / "out")
    d = state(ft)[EMB] - state(src)[EMB]
    assert torch.allclose(state(out.path)[HEAD], sd[HEAD] + d, atol=1e-6)


def test_integer_buffers_are_copied_and_one_sided_keys_reported(tmp_path):
    base = make_model(tmp_path / "base")
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.02, seed=1)
    sb, sf = state(base), state(ft)
    sb["model.step"] = torch.tensor([3], dtype=torch.int64)
    sf["model.step"] = torch.tensor([9], dtype=torch.int64)
    sf["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)  # a new QK-norm only the fine-tune has
    save_file(sb, str(base / "model.safetensors"), metadata={"format": "pt"})
    save_file(sf, str(ft / "model.safetensors"), metadata={"format": "pt"})
    patch = patchlab.extract(base, ft, tmp_path / "patch")
    assert patch.entry("model.step").op == "set"
    assert patch.entry("model.layers.0.self_attn.q_norm.weight").op == "set"
    out = patchlab.apply(patch, base, tmp_path / "out")
    so = state(out.path)
    assert so["model.step"].dtype == torch.int64 and int(so["model.step"]) == 9
    assert torch.equal(so["model.layers.0.self_attn.q_norm.weight"], torch.ones(8))


def test_port_that_would_skip_many_parameters_is_refused(tmp_path, family):
    src, ft, patch = family
    tgt = make_model(tmp_path / "tgt", layers=1)  # a release that lost a layer
    with pytest.raises(PlanError, match="--force"):
        patchlab.port(patch, tgt, tmp_path / "out")
    plan = patchlab.port(patch, tgt, tmp_path / "out", force=True, dry_run=True)
    assert plan.summary()["unused_tensors"] == 9


def test_patch_for_another_architecture(tmp_path, family):
    src, ft, patch = family
    other = make_model(tmp_path / "other", hidden=48)
    with pytest.raises(IncompatiblePatchError, match="another architecture"):
        patchlab.apply(patch, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prefixed_names_are_matched(tmp_path, family):
    src, ft, patch = family
    tgt = tmp_path / "wrapped"
    tgt.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tgt / f).write_text((src / f).read_text())
    save_file({f"language_model.{k}": v for k, v in state(src).items()}, str(tgt / "model.safetensors"))
    plan = patchlab.apply(patch, tgt, tmp_path / "out", dry_run=True)
    assert plan.summary()["tensors"]["add"] == 21 and "prefix" in plan.warnings[0]


def test_plan_is_printable_and_serialisable(tmp_path, family):
    src, ft, patch = family
    plan = patchlab.port(patch, src, tmp_path / "out", dry_run=True, alpha_by_pattern={"*.mlp.*": 0.5})
    j = json.loads(plan.dumps())
    assert j["operation"] == "port" and j["summary"]["tensors"]["add"] == 21
    assert {s["alpha"] for s in j["steps"] if "mlp" in s["name"]} == {0.5}
    assert "add" in plan.render() and not (tmp_path / "out").exists()
