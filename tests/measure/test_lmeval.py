"""Reading lm-evaluation-harness --log_samples files."""

from __future__ import annotations

import json

import pytest

from patchlab.measure.flips import compare
from patchlab.measure.lmeval import LMEvalFormatError, read_samples, read_samples_dir, task_from_filename


def mc_row(doc_id, lls, acc, acc_norm, prompt="Q?", choices=(" a", " bbbb", " cc"), target=0):
    return {
        "doc_id": doc_id,
        "doc": {"q": prompt},
        "target": target,
        "arguments": [[prompt, c] for c in choices],
        "resps": [[[ll, False]] for ll in lls],
        "filtered_resps": [[ll, False] for ll in lls],
        "filter": "none",
        "metrics": ["acc", "acc_norm"],
        "doc_hash": "d",
        "prompt_hash": f"ph-{prompt}",
        "target_hash": "t",
        "acc": acc,
        "acc_norm": acc_norm,
    }


def sanitized(row):
    """The same row as lm-eval >= 0.4 writes it: arguments as gen_args dicts, responses as strings."""
    r = dict(row)
    r["arguments"] = {f"gen_args_{i}": {f"arg_{j}": x for j, x in enumerate(a)} for i, a in enumerate(row["arguments"])}
    r["resps"] = [[[str(x) for x in rr] for rr in resp] for resp in row["resps"]]
    r["filtered_resps"] = [[str(x) for x in fr] for fr in row["filtered_resps"]]
    r["target"] = str(row["target"])
    return r


def gen_row(doc_id, text, em, flt="strict-match", prompt="Q?"):
    return {
        "doc_id": doc_id,
        "doc": {},
        "target": "x",
        "arguments": [[prompt, {"until": ["\n"]}]],
        "resps": [[text]],
        "filtered_resps": [text],
        "filter": flt,
        "metrics": ["exact_match"],
        "doc_hash": "d",
        "prompt_hash": f"ph-{prompt}",
        "target_hash": "t",
        "exact_match": em,
    }


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_task_name_from_file_name():
    assert task_from_filename("samples_hellaswag_2024-05-30T12-34-56.123456.jsonl") == "hellaswag"
    assert task_from_filename("x/samples_mmlu_high_school_2025-01-01T00-00-00.jsonl") == "mmlu_high_school"
    with pytest.raises(LMEvalFormatError, match="task="):
        task_from_filename("results.json")


@pytest.mark.parametrize("style", [lambda r: r, sanitized], ids=["plain", "sanitized"])
def test_multiple_choice_rows(tmp_path, style):
    f = write(
        tmp_path / "samples_arc_2024-05-30T12-34-56.jsonl",
        # row order shuffled on purpose
        [style(mc_row(1, [-3.0, -4.0, -6.0], 0.0, 1.0, target=1)), style(mc_row(0, [-1.0, -2.0, -3.0], 1.0, 1.0))],
    )
    recs = {r.doc_id: r for r in read_samples(f)}
    assert set(recs) == {"0", "1"}
    assert recs["0"].task == "arc" and recs["0"].correct and recs["0"].prediction == 0
    assert recs["1"].prediction == 0 and not recs["1"].correct
    assert recs["1"].kind == "multiple_choice" and recs["1"].prompt_hash == "ph-Q?"
    # acc_norm over the choices' lengths without the delimiter: -3/1, -4/4, -6/2 -> choice 1 (" bbbb") wins
    normed = {r.doc_id: r for r in read_samples(f, metric="acc_norm")}
    assert normed["1"].prediction == 1 and normed["1"].correct


def test_generation_rows_with_filters(tmp_path):
    f = write(
        tmp_path / "samples_gsm8k_2024-05-30T12-34-56.jsonl",
        [gen_row(0, "42", 1.0), gen_row(0, "forty-two", 0.0, flt="flexible-extract")],
    )
    recs = read_samples(f)
    assert {(r.filter, r.correct, r.score) for r in recs} == {
        ("strict-match", True, 1.0),
        ("flexible-extract", False, 0.0),
    }
    assert all(r.kind == "generation" for r in recs)
    only = read_samples(f, filters=["strict-match"])
    assert len(only) == 1 and only[0].prediction == "42"


def test_compare_two_runs_from_files(tmp_path):
    old = tmp_path / "old"
    new = tmp_path / "new"
    old.mkdir()
    new.mkdir()
    write(
        old / "samples_arc_2024-01-01T00-00-00.jsonl",
        [mc_row(0, [-1.0, -2.0, -3.0], 1.0, 1.0), mc_row(1, [-1.0, -2.0, -3.0], 1.0, 1.0)],
    )
    write(old / "samples_gsm8k_2024-01-01T00-00-00.jsonl", [gen_row(0, "42", 1.0), gen_row(1, "1", 0.0)])
    write(
        new / "samples_arc_2024-02-01T00-00-00.jsonl",
        [mc_row(0, [-4.0, -2.0, -3.0], 0.0, 0.0), mc_row(1, [-1.0, -2.0, -3.0], 1.0, 1.0)],
    )
    write(new / "samples_gsm8k_2024-02-01T00-00-00.jsonl", [gen_row(0, "42", 1.0), gen_row(1, "7", 1.0)])
    rep = compare(read_samples_dir(old), read_samples_dir(new))
    assert rep.groups["arc"].negative_flip_ids == ["0"]
    assert rep.groups["gsm8k[strict-match]"].positive_flip_ids == ["1"]
    assert rep.groups["gsm8k[strict-match]"].muscle.n_gain == 1
    assert rep.overall.n == 4 and rep.overall.nfr == pytest.approx(0.25)


def test_prompt_change_between_runs_refused(tmp_path):
    a = write(tmp_path / "samples_arc_2024-01-01T00-00-00.jsonl", [mc_row(0, [-1.0, -2.0], 1, 1, prompt="A")])
    b = write(tmp_path / "samples_arc_2024-02-01T00-00-00.jsonl", [mc_row(0, [-1.0, -2.0], 1, 1, prompt="B")])
    from patchlab.measure.flips import ResultsMismatchError

    with pytest.raises(ResultsMismatchError, match="prompts differ"):
        compare(read_samples(a), read_samples(b))


def test_directory_reads_newest_run_per_task(tmp_path):
    write(tmp_path / "samples_arc_2024-01-01T00-00-00.jsonl", [mc_row(0, [-1.0, -2.0], 1.0, 1.0)])
    write(tmp_path / "samples_arc_2024-03-01T00-00-00.jsonl", [mc_row(0, [-3.0, -2.0], 0.0, 0.0)])
    recs = read_samples_dir(tmp_path)
    assert len(recs) == 1 and recs[0].prediction == 1
    with pytest.raises(LMEvalFormatError, match="no samples file for task"):
        read_samples_dir(tmp_path, tasks=["mmlu"])


def test_bad_files(tmp_path):
    f = tmp_path / "samples_arc_2024-01-01T00-00-00.jsonl"
    f.write_text('{"doc_id": 0, "acc": 1.0}\n{"doc_id": 1, "ac')
    with pytest.raises(LMEvalFormatError, match="line 2: not valid JSON"):
        read_samples(f)
    f.write_text('{"doc_id": 0, "bleu": 3.0}\n')
    with pytest.raises(LMEvalFormatError, match="correctness metrics"):
        read_samples(f)
    f.write_text('{"doc_id": 0, "acc": null}\n')
    with pytest.raises(LMEvalFormatError, match="not a finite number"):
        read_samples(f)
    with pytest.raises(LMEvalFormatError, match="no samples_"):
        read_samples_dir(tmp_path / "empty_dir_that_is_missing")


def test_two_models_under_one_directory_refused(tmp_path):
    for model in ("model-a", "model-b"):
        (tmp_path / model).mkdir()
        write(tmp_path / model / "samples_arc_2024-01-01T00-00-00.jsonl", [mc_row(0, [-1.0, -2.0], 1.0, 1.0)])
    with pytest.raises(LMEvalFormatError, match="one directory per model"):
        read_samples_dir(tmp_path)
    assert len(read_samples_dir(tmp_path / "model-a")) == 1
