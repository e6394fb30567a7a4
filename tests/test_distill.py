"""Stage 00b: answer verification, the resumable cache (killed mid-run), and the distilled set feeding training."""

import json
import signal
import subprocess
import sys
import time

import pytest

from medcot_lib import data, distill, recipe
from medcot_lib.data import Record
from medcot_lib.errors import MedcotError

OPTIONS = {"A": "Warm autoimmune hemolytic anemia", "B": "Hereditary spherocytosis", "C": "G6PD deficiency", "D": "Thalassemia"}
MCQ = Record("m1", "medqa", "A Coombs-positive anemia with spherocytes after starting methyldopa. Diagnosis?", OPTIONS["A"],
             options=OPTIONS, gold="A")
YES_NO = Record("p1", "pubmedqa", "Does the intervention reduce readmissions?", "long answer", gold="no")


@pytest.mark.parametrize(("record", "output", "verdict", "extracted"), [
    (MCQ, "<think>Direct antiglobulin test positive, drug-induced.</think>\nThe answer is (A).", "accepted", "A"),
    (MCQ, "<think>Spherocytes suggest a membrane defect.</think>\nThe answer is (B).", "wrong answer", "B"),
    (MCQ, "The answer is (A).", "no reasoning block", "A"),  # right letter, but no reasoning to learn from
    (MCQ, "<think>DAT positive, so immune hemolysis, and the drug", "truncated", None),  # no answer was reached
    (MCQ, "<think>Either immune or membrane.</think>\nThe answer is (A) or (B).", "ambiguous", None),
    (MCQ, "<think>Immune.</think>\n", "unparsed", None),
    (YES_NO, "<think>The trial found no difference.</think>\nThe answer is no.", "accepted", "no"),
    (YES_NO, "<think>Readmissions fell.</think>\nThe answer is yes.", "wrong answer", "yes"),
    (Record("o1", "notes", "Explain warm AIHA.", "ref"), "<think>IgG.</think>\nIgG-mediated extravascular hemolysis.",
     "unverified", "IgG-mediated extravascular hemolysis."),
])
def test_judge_accepts_only_reasoning_that_reaches_the_gold_answer(record, output, verdict, extracted):
    result = distill.judge(record, output)
    assert (result["verdict"], result["extracted"]) == (verdict, extracted)


def test_cache_discards_a_half_written_line_and_refuses_another_teacher(tmp_path):
    path = tmp_path / "cache.jsonl"
    row = {"key": "k1", "attempt": 1, "teacher": "llamacpp:t.gguf@abc", "output": "x"}
    path.write_text(json.dumps(row) + "\n" + '{"key": "k2", "attempt": 1, "teach')
    cache = distill.Cache(path, "llamacpp:t.gguf@abc")
    assert cache.discarded_partial_line and cache.get("k1", 1)["output"] == "x" and cache.get("k2", 1) is None
    assert path.read_text() == json.dumps(row) + "\n"
    with pytest.raises(MedcotError, match=r"cache.jsonl, line 1, field 'teacher'.*refusing to mix teachers"):
        distill.Cache(path, "hf:other-model")
    path.write_text("not json\n" + json.dumps(row) + "\n")
    with pytest.raises(MedcotError, match=r"cache.jsonl, line 1: corrupt cache line"):
        distill.Cache(path, "llamacpp:t.gguf@abc")


def demo_recipe(**overrides):
    return recipe.load("params/cpu-demo.yaml", {"distill_max_new_tokens": 40, "distill_attempts": 2, **overrides})


RUN = """
import sys
from medcot_lib import distill, recipe
cfg = recipe.load("params/cpu-demo.yaml", {"distill_max_new_tokens": 40, "distill_attempts": 2})
questions, _ = distill.select_questions(cfg, [])
distill.distill(cfg, sys.argv[1], distill.load_teacher(cfg), questions, progress=False)
"""


def cache_lines(run_dir):
    path = run_dir / distill.CACHE
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.integration
def test_killed_mid_run_then_resumed_loses_and_duplicates_nothing(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", RUN, str(straight)], check=True, capture_output=True)
    process = subprocess.Popen([sys.executable, "-c", RUN, str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(cache_lines(killed)) < 3 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = cache_lines(killed)
    assert 3 <= len(written) < len(cache_lines(straight)), "the kill must land mid-run"
    with open(killed / distill.CACHE, "a") as f:  # as if killed in the middle of a write
        f.write('{"key": "torn", "attempt": 1, "teacher": "llam')

    cfg = demo_recipe()
    questions, _ = distill.select_questions(cfg, [])
    teacher = distill.load_teacher(cfg)
    outcomes = distill.distill(cfg, killed, teacher, questions, progress=False)
    teacher.close()
    resumed = cache_lines(killed)
    assert resumed[: len(written)] == written  # kept, not regenerated
    keys = [(json.loads(line)["key"], json.loads(line)["attempt"]) for line in resumed]
    assert len(keys) == len(set(keys))  # no duplicates
    # Seeds are derived from (question, attempt), so the interrupted run ends exactly where the uninterrupted one did.
    assert sorted(resumed) == sorted(cache_lines(straight))
    assert len(outcomes) == len(questions) == 6
    assert all(o["attempt"] == 2 or o["verdict"] == "accepted" for o in outcomes)


def test_distilled_items_load_in_the_train_stage(tmp_path, tokenizer):
    from medcot_lib import prompts, train

    accepted = {"record": MCQ, "attempt": 2, "verdict": "accepted", "reasoning": "DAT positive after methyldopa: immune hemolysis.",
                "final": "The answer is (A).", "extracted": "A"}
    rejected = {**accepted, "verdict": "wrong answer"}
    cfg = demo_recipe(min_cot_chars=0, val_size=0, test_size=0,
                      dataset_mixture=[{"path": "run:distilled"}])
    (tmp_path / "distill").mkdir()
    rows = [distill.to_medical_o1(o, "llamacpp:t.gguf@abc") for o in distill.kept(cfg, [accepted, rejected])]
    (tmp_path / distill.OUTPUT).write_text(json.dumps(rows))
    prepared = data.prepare(cfg, tmp_path)
    (item,) = prepared.splits["train"]
    assert item.source == "distilled" and item.reasoning == accepted["reasoning"] and "Options:\nA. Warm" in item.question
    rows = train.tokenize(prepared.splits["train"], tokenizer, prompts.PromptStyle.from_recipe(cfg), 1024, True)
    assert rows.truncated == 0 and len(rows.rows) == 1


def test_before_stage_00b_a_distilled_only_mixture_gives_empty_splits(tmp_path):
    cfg = demo_recipe(dataset_mixture=[{"path": "run:distilled"}])
    prepared = data.prepare(cfg, tmp_path)
    assert prepared.splits == {"train": [], "val": [], "test": []}
    assert any(s.step == "empty source" and s.source == "distilled" for s in prepared.steps)


def test_bad_distillation_settings_are_clear_errors(tmp_path, write):
    with pytest.raises(MedcotError, match="distill_attempts: .*greater than or equal to 1"):
        demo_recipe(distill_attempts=0)
    with pytest.raises(MedcotError, match="teacher_model is needed"):
        demo_recipe(teacher_model=None)
    with pytest.raises(MedcotError, match="run:distilled, which stage 00b writes only with distillation: true"):
        demo_recipe(distillation=False)
    with pytest.raises(MedcotError, match="needs a .gguf file or an embedded: model"):
        distill.load_teacher(demo_recipe(teacher_model=str(tmp_path)))
    empty = write("none.jsonl", "")
    with pytest.raises(MedcotError, match="none.jsonl: file is empty"):
        distill.select_questions(demo_recipe(distill_sources=[{"path": str(empty)}]), [])


def test_questions_overlapping_an_eval_set_are_never_distilled():
    cfg = demo_recipe(distill_sources=[{"path": "bundled:medqa", "max_samples": 5}])
    medqa, _ = data.load_source(cfg.distill_sources[0])
    with pytest.raises(MedcotError, match="left no questions"):
        distill.select_questions(cfg, medqa)
