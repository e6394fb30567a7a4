"""Stage 04 logic on constructed generations: eval-set checks, scoring, paired summaries, leaderboard."""

import json

import pytest

from medcot_lib import evaluate, export, leaderboard
from medcot_lib.data import Record
from medcot_lib.errors import MedcotError
from medcot_lib.generate import Generation

OPTIONS = {"A": "Folate deficiency", "B": "Vitamin B12 deficiency", "C": "Iron deficiency", "D": "Thalassemia trait"}


def mcq(i, gold="B"):
    return Record(f"q{i}", "medqa", f"Question {i}?", OPTIONS[gold], options=OPTIONS, gold=gold)


def gen(record, output, new_tokens=20, stopped=True):
    return Generation(record.id, record.source, "prompt", output, None, "", 10, new_tokens, stopped)


def test_eval_set_checks_name_the_file_line_and_field(tmp_path):
    path = tmp_path / "medqa.jsonl"
    bad = [mcq(1), Record("q2", "medqa", "Q?", "x", options=OPTIONS, gold="E")]
    with pytest.raises(MedcotError, match=r"medqa.jsonl, line 2, field 'gold'.*'E' is not one of the option letters"):
        evaluate.check_eval_set("medqa", bad, path, open_allowed=False)
    no_gold = [Record("x1", "mine", "Q?", "some answer")]
    with pytest.raises(MedcotError, match=r"line 1, field 'gold'.*only the held-out split may be open-ended"):
        evaluate.check_eval_set("mine", no_gold, path, open_allowed=False)
    mixed = [mcq(1), Record("p1", "pubmedqa", "Q?", "long", gold="yes")]
    with pytest.raises(MedcotError, match="mixes item kinds"):
        evaluate.check_eval_set("mixed", mixed, path, open_allowed=False)
    assert evaluate.check_eval_set("medqa", [mcq(1)], path, open_allowed=False) == "mcq"
    assert evaluate.check_eval_set("heldout", no_gold, path, open_allowed=True) == "open"


def test_subsample_is_fixed_by_seed_and_keeps_order():
    records = [mcq(i) for i in range(50)]
    first = evaluate.subsample(records, 10, 0, "medqa")
    assert first == evaluate.subsample(records, 10, 0, "medqa") and len(first) == 10
    assert [int(r.id[1:]) for r in first] == sorted(int(r.id[1:]) for r in first)
    assert first != evaluate.subsample(records, 10, 1, "medqa")
    assert evaluate.subsample(records, None, 0, "medqa") == records == evaluate.subsample(records, 99, 0, "medqa")


def scored_set(base_outputs, tuned_outputs, golds):
    records = [mcq(i, g) for i, g in enumerate(golds)]
    eval_set = evaluate.EvalSet("medqa", "mcq", records, len(records), "medqa.jsonl")
    generations = {"items": [("medqa", r) for r in records], "tokenizer": lambda text, **_: {"input_ids": text.split()},
                   "base": [gen(r, o) for r, o in zip(records, base_outputs, strict=True)],
                   "fine-tuned": [gen(r, o) for r, o in zip(records, tuned_outputs, strict=True)]}
    return eval_set, evaluate.score_all([eval_set], generations)


def test_no_output_is_dropped_and_failures_count_as_wrong():
    eval_set, rows = scored_set(
        base_outputs=["", "<think>B looks right, then", "The answer is (B).", "A or C"],
        tuned_outputs=["<think>MCV high.</think>\nThe answer is (B) Vitamin B12 deficiency.", "<think>x</think> The answer is (B).",
                       "<think>x</think> The answer is (A).", "<think>x</think> Answer: (c)"],
        golds=["B", "B", "B", "C"])
    assert len(rows) == 8
    base = evaluate.model_metrics("mcq", [r for r in rows if r["model"] == "base"], 200)
    tuned = evaluate.model_metrics("mcq", [r for r in rows if r["model"] == "fine-tuned"], 200)
    assert base["accuracy"]["value"] == 0.25 and base["accuracy"]["n"] == 4
    assert base["extraction_failure_rate"]["value"] == 0.75
    assert base["failures"] == {"empty": 1, "truncated": 1, "unparsed": 0, "ambiguous": 1}
    assert tuned["accuracy"]["value"] == 0.75 and tuned["format_compliance"]["value"] == 1.0
    assert tuned["reasoning_tokens"]["n"] == 4


def test_paired_summary_uses_mcnemar_and_reruns_identically():
    golds = ["B"] * 30
    base = ["The answer is (A)."] * 20 + ["The answer is (B)."] * 10
    tuned = ["<think>r</think> The answer is (B)."] * 28 + ["<think>r</think> The answer is (A)."] * 2
    eval_set, rows = scored_set(base, tuned, golds)
    summary = evaluate.summarise([eval_set], rows, 500)
    diff = summary["medqa"]["difference"]["accuracy"]
    # base right & tuned wrong: items 28, 29 (b = 2); base wrong & tuned right: items 0-19 (c = 20)
    assert (diff["b"], diff["c"]) == (2, 20) and diff["test"] == "mcnemar-exact"
    assert diff["difference"] == pytest.approx(28 / 30 - 10 / 30) and diff["low"] > 0 and diff["p_value"] < 0.001
    assert summary == evaluate.summarise([eval_set], rows, 500)
    table = evaluate.metrics_table(summary)
    assert set(table["metric"]) == {"accuracy", "format_compliance", "extraction_failure_rate"}


def test_decision_and_open_sets_get_their_own_metrics():
    records = [Record(f"p{i}", "pubmedqa", "Q?", "long answer", gold=g) for i, g in enumerate(["yes", "no", "maybe", "yes"])]
    decision = evaluate.EvalSet("pubmedqa", "decision", records, 4, "p.jsonl")
    held = [Record("h1", "medical-o1", "Q?", "Vitamin B12 deficiency causes macrocytic anemia")]
    open_set = evaluate.EvalSet("heldout", "open", held, 1, "test.jsonl")
    outputs = ["The answer is yes.", "Answer: no", "The answer is yes.", "maybe"]
    held_out = "<think>x</think> Vitamin B12 deficiency causes anemia"
    generations = {"items": [("pubmedqa", r) for r in records] + [("heldout", held[0])],
                   "tokenizer": lambda text, **_: {"input_ids": text.split()},
                   "base": [gen(r, o) for r, o in zip(records, outputs, strict=True)] + [gen(held[0], "")],
                   "fine-tuned": [gen(r, o) for r, o in zip(records, outputs, strict=True)] + [gen(held[0], held_out)]}
    rows = evaluate.score_all([decision, open_set], generations)
    summary = evaluate.summarise([decision, open_set], rows, 200)
    assert summary["pubmedqa"]["base"]["accuracy"]["value"] == 0.5
    # yes: tp 1 fp 1 fn 1 -> 0.5; no: 1.0; maybe: tp 0 fp 1 fn 1 -> 0
    assert summary["pubmedqa"]["base"]["macro_f1"]["value"] == pytest.approx(0.5)
    assert summary["heldout"]["base"]["rouge_l"]["value"] == 0.0
    assert summary["heldout"]["fine-tuned"]["token_f1"]["value"] > 0.7
    assert summary["heldout"]["headline"] == "rouge_l"


def write_run(root, name, summary, parameters):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({"settings": {}, "sets": summary}))
    (run / "manifest.json").write_text(json.dumps({"run_name": name, "created": "2026-11-22T03:00:00+00:00",
                                                   "parameters": parameters}))


def test_leaderboard_rebuild_is_idempotent_and_names_the_method(tmp_path):
    eval_set, rows = scored_set(["The answer is (A)."] * 6, ["The answer is (B)."] * 6, ["B"] * 6)
    summary = evaluate.summarise([eval_set], rows, 200)
    params = {"model_name_or_path": "embedded:smollm2-135m-instruct", "lora_r": 16, "lora_alpha": 32, "load_in_4bit": True,
              "use_dora": True, "dataset_mixture": [{"path": "bundled:medical-o1", "weight": 0.5}]}
    write_run(tmp_path, "run-b", summary, params)
    write_run(tmp_path, "run-a", summary, {**params, "load_in_4bit": False, "use_dora": False})
    (tmp_path / "not-evaluated").mkdir()
    table = leaderboard.rebuild(tmp_path)
    first = (tmp_path / "leaderboard.csv").read_bytes(), (tmp_path / "leaderboard.md").read_bytes()
    leaderboard.rebuild(tmp_path)
    assert first == ((tmp_path / "leaderboard.csv").read_bytes(), (tmp_path / "leaderboard.md").read_bytes())
    assert list(table["run"]) == ["run-a", "run-b"] and list(table["method"]) == ["LoRA r16/a32", "QDoRA r16/a32"]
    assert table["data"][0] == "bundled:medical-o1×0.5" and table["base"][0].startswith("0.000")
    assert "Educational and research use only" in first[1].decode()


def test_missing_stage_outputs_say_which_stage_to_run(tmp_path):
    from medcot_lib import recipe

    cfg = recipe.load("params/cpu-demo.yaml")
    with pytest.raises(MedcotError, match="run stage 00"):
        evaluate.load_eval_sets(cfg, tmp_path)
    with pytest.raises(MedcotError, match="run stage 03"):
        export.adapter_dir(tmp_path)
    with pytest.raises(MedcotError, match="run stage 03"):
        evaluate.training_log(tmp_path)
