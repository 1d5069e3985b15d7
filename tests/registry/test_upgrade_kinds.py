"""Merged and edit patches in an upgrade, on SQLite and PostgreSQL: a merged patch (``blend``) is rebuilt from
its parents' new versions with its recorded recipe (lineage ``merge`` to them), an edit patch (``facts``) is
ported and its edit set re-evaluated with the WILD protocol on the new base (figures stored, gated on
``reliability``), next to a plain patch (``task``) and one made to fail its gate (``strict``)."""

from __future__ import annotations

import pytest

from patchlab.io.patch import Patch
from registry.workflows.upgrade import plan_upgrade, run_upgrade
from tests.upgrade_helpers import BLEND_RECIPE, build_family, make_edit_patch, state, strays

PATCHES = ("task", "stored", "strict", "blend", "facts")


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def edit_patch(tmp_path_factory):
    return make_edit_patch(tmp_path_factory.mktemp("edit"))


@pytest.fixture(scope="module")
def upgraded(request, backend, edit_patch, tmp_path_factory):
    server = request.getfixturevalue("pg_server") if backend == "postgresql" else None
    fam = build_family(
        tmp_path_factory.mktemp("kinds"), patches=PATCHES, backend=backend, server=server, edit_patch=edit_patch
    )
    with fam.open() as reg:
        plan = plan_upgrade(reg, "tiny", "v2")
        result = run_upgrade(reg, "tiny", "v2", device="cpu", jobs=2)
    return fam, plan, result


def test_plan_orders_merged_patches_after_their_parents(upgraded):
    _, plan, _ = upgraded
    kinds = {p.name: p.kind for p in plan.patches}
    assert kinds == {"task": "port", "stored": "port", "strict": "port", "blend": "merge", "facts": "edit"}
    assert [p.name for p in plan.patches][-1] == "blend" and plan.problems == []
    blend = next(p for p in plan.patches if p.name == "blend")
    assert blend.parents == ["task", "stored"]
    assert blend.recipe["method"] == "ties" and blend.recipe["seed"] == 3 and blend.recipe["weights"] == [0.7, 0.6]


def test_merged_patch_is_rebuilt_from_its_upgraded_parents(upgraded):
    fam, _, result = upgraded
    with fam.open() as reg:
        blend = reg.get_patch("blend@2")
        assert blend.base == "tiny@v2" and blend.method == "merge"
        assert blend.parents == (("task@2", "merge"), ("stored@2", "merge"))
        assert reg.get_patch("blend@latest").ref == "blend@2"
        prov = Patch.open(reg.patch_path("blend@2")).provenance
        assert prov["parameters"]["seed"] == BLEND_RECIPE["seed"] and prov["parameters"]["method"] == "ties"
        assert prov["parameters"]["weights"] == BLEND_RECIPE["weights"]
        assert [i["digest"] for i in prov["inputs"]] == [
            dict((n, d) for n, d, _ in reg.get_patch(r, detail=True).files)["patch.json"]
            for r in ("task@2", "stored@2")
        ]
        assert reg.verify().ok
    row = {p["patch"]: p for p in result.summary["patches"]}["blend"]
    assert row["gate"] == "pass" and row["alias_moved"]


def test_edit_patch_is_ported_and_its_edits_re_evaluated_and_gated(upgraded):
    fam, _, result = upgraded
    with fam.open() as reg:
        facts = reg.get_patch("facts@2")
        assert facts.base == "tiny@v2" and facts.parents == (("facts@1", "port"),)
        wild = [e for e in reg.list_evaluations("facts@2", kind="patch") if e.dataset == "wild"]
        assert len(wild) == 1 and wild[0].metrics["n_edits"] == 10
        assert wild[0].metrics["edits_sha256"] == reg.get_patch("facts@1").parameters["edits_sha256"]
        run = reg.get_run(result.run.id)
        edits = next(s for s in run.steps if s.patch == "facts" and s.step == "edits")
        assert edits.state == "done" and edits.outcome["reliability"] == wild[0].metrics["reliability"]
        gate = next(s for s in run.steps if s.patch == "facts" and s.step == "gate").outcome
        assert gate["values"]["reliability"] >= 0.8 and gate["passed"]
        assert "reliability >= 0.8" in [r["expression"] for r in gate["results"]]
        assert not any(s.step == "edits" for s in run.steps if s.patch != "facts")
    rows = {p["patch"]: p for p in result.summary["patches"]}
    assert rows["facts"]["reliability"] == edits.outcome["reliability"] and rows["facts"]["alias_moved"]
    assert rows["strict"]["gate"] == "fail" and not rows["strict"]["alias_moved"]
    assert {n for n, r in rows.items() if r["gate"] == "pass"} == {"task", "stored", "blend", "facts"}
    assert strays(fam) == []


def test_rerun_is_a_no_op(upgraded):
    fam, _, result = upgraded
    before = state(fam)
    with fam.open() as reg:
        again = run_upgrade(reg, "tiny", "v2", device="cpu")
    assert again.already_done and again.run.id == result.run.id and state(fam) == before
