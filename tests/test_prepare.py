"""Preparation: filters, deduplication, decontamination, mixture weights and splits are deterministic and report every drop."""

import pytest

from medcot_lib import data, recipe
from medcot_lib.data import Record
from medcot_lib.errors import MedcotError
from medcot_lib.recipe import DatasetSource

COT = ("Okay, the smear shows macro-ovalocytes and hypersegmented neutrophils, so this is a megaloblastic "
       "process; methylmalonic acid separates B12 from folate deficiency. ") * 3


def rec(i, question, reasoning=COT, source="s", answer="Check B12 and folate."):
    return Record(id=f"{source}-{i}", source=source, question=question, reasoning=reasoning, answer=answer)


QUESTIONS = [
    "A 70-year-old vegan man has numbness in both feet and an MCV of 118 fL.",
    "A 25-year-old woman with heavy periods has a ferritin of 6 ng/mL and an MCV of 71 fL.",
    "A 60-year-old man on warfarin has an INR of 9 and melena.",
    "A 19-year-old man with sickle cell disease has chest pain, fever and a new infiltrate.",
    "A 45-year-old woman received a unit of red cells after a hip replacement and, within minutes of the start, "
    "developed fever, chills, flank pain, hypotension and dark urine; the nurse notices the unit was labelled for "
    "the patient in the next bed.",
]


def test_quality_filter_reports_each_reason():
    records = [rec(0, QUESTIONS[0]), rec(1, QUESTIONS[1], reasoning=None), rec(2, QUESTIONS[2], reasoning="short"),
               rec(3, "  ", answer="x"), rec(4, QUESTIONS[4], answer="")]
    kept, report = data.quality_filter(records, min_cot_chars=200)
    assert [r.id for r in kept] == ["s-0"]
    assert report.reasons == {"no reasoning (min_cot_chars=200)": 1, "reasoning shorter than 200 chars": 1,
                              "empty question": 1, "empty answer": 1}
    assert report.before == 5 and report.after == 1


def test_exact_and_near_duplicates_are_dropped_first_kept():
    near = QUESTIONS[4].replace("hip replacement", "knee replacement")  # 3 of 37 word 3-grams differ
    records = [rec(i, q) for i, q in enumerate(QUESTIONS)] + [rec(10, QUESTIONS[1].upper()), rec(11, near)]
    kept, report = data.deduplicate(records, threshold=0.8)
    assert [r.id for r in kept] == [f"s-{i}" for i in range(5)]
    assert report.reasons == {"exact duplicate": 1, "near duplicate (Jaccard >= 0.8)": 1}
    assert "s-11 ~ s-4" in report.examples


def test_dissimilar_items_survive_a_strict_threshold():
    records = [rec(i, q) for i, q in enumerate(QUESTIONS)]
    kept, report = data.deduplicate(records, threshold=0.3)
    assert len(kept) == 5 and report.dropped == 0


def test_decontamination_drops_exactly_at_the_threshold():
    eval_item = Record(id="e1", source="medqa", question="A 34-year-old man develops hemoglobinuria and hypotension "
                       "minutes after the start of a transfusion of packed red cells in the recovery room.", answer="x")
    shared = eval_item.question[5:75]  # 70 shared characters
    barely = eval_item.question[5:68]  # 63 shared characters
    records = [rec(0, "Teaching case: " + shared + " What next?"), rec(1, "Teaching case: " + barely + " What next?"),
               rec(2, QUESTIONS[3], reasoning="He said: " + shared.upper())]
    kept, report = data.decontaminate(records, [eval_item], chars=64)
    assert [r.id for r in kept] == ["s-1"]
    assert report.reasons == {"shares 64+ chars with eval data": 2}
    assert data.decontaminate(records, [eval_item], chars=0)[0] == records


def test_mixture_weights_and_caps_are_deterministic():
    pool = {"a": [rec(i, f"q{i}", source="a") for i in range(40)], "b": [rec(i, f"q{i}", source="b") for i in range(10)]}
    sources = [DatasetSource(path="bundled:medqa", name="a", weight=0.5), DatasetSource(path="bundled:medqa", name="b", weight=1.0, max_samples=4)]
    mixed, reports = data.sample_mixture(pool, sources, seed=1)
    again, _ = data.sample_mixture(pool, sources, seed=1)
    other, _ = data.sample_mixture(pool, sources, seed=2)
    assert [r.id for r in mixed] == [r.id for r in again]
    assert [r.id for r in mixed] != [r.id for r in other]
    assert sum(r.source == "a" for r in mixed) == 20 and sum(r.source == "b" for r in mixed) == 4
    assert [(r.before, r.dropped) for r in reports] == [(40, 20), (10, 6)]


def test_split_by_ratio_and_count_is_seeded():
    records = [rec(i, f"q{i}") for i in range(100)]
    by_ratio = data.split(records, 0.1, 0.2, seed=42)
    assert {k: len(v) for k, v in by_ratio.items()} == {"train": 70, "val": 10, "test": 20}
    assert data.split(records, 0.1, 0.2, seed=42) == by_ratio
    assert data.split(records, 0.1, 0.2, seed=7)["test"] != by_ratio["test"]
    by_count = data.split(records, 5, 3, seed=42)
    assert {k: len(v) for k, v in by_count.items()} == {"train": 92, "val": 5, "test": 3}
    assert sorted(r.id for part in by_ratio.values() for r in part) == sorted(r.id for r in records)
    with pytest.raises(MedcotError, match="ask for 100 items but only 100 remain"):
        data.split(records, 50, 50, seed=1)


def test_prepare_cpu_demo_accounts_for_every_item():
    cfg = recipe.load("params/cpu-demo.yaml")
    prepared = data.prepare(cfg)
    loaded = sum(r.kept for r in prepared.loads if r.source == "medical-o1-concise")
    assert prepared.steps[0].before == loaded
    for earlier, later in zip(prepared.steps[:3], prepared.steps[1:4], strict=True):
        assert later.before == earlier.after
    mixture = [s for s in prepared.steps if s.step == "mixture"]
    assert sum(len(v) for v in prepared.splits.values()) == sum(s.after for s in mixture)
    (pending,) = [s for s in prepared.steps if s.step == "empty source"]  # run:distilled, before stage 00b
    assert pending.source == "distilled" and pending.after == 0
    assert set(prepared.eval_sets) == {"medqa", "pubmedqa"}
    again = data.prepare(cfg)
    assert {k: [r.id for r in v] for k, v in again.splits.items()} == {k: [r.id for r in v] for k, v in prepared.splits.items()}


def test_prepare_refuses_when_filters_leave_nothing_naming_the_step_setting_and_lengths():
    cfg = recipe.load("params/cpu-demo.yaml", {"min_cot_chars": 100_000})
    with pytest.raises(MedcotError, match=r"no training items are left: the quality step \(setting `min_cot_chars=100000`\) "
                                          r"removed all 234 .*it saw reasoning lengths \d+-\d+ chars \(median \d+\)"):
        data.prepare(cfg)


def test_decontamination_that_removes_everything_is_named():
    cfg = recipe.load("params/cpu-demo.yaml", {"dataset_mixture": [{"path": "bundled:medqa"}], "min_cot_chars": 0})
    with pytest.raises(MedcotError, match=r"the decontaminate step \(setting `decontamination_chars=64`\) removed all 84 "
                                          r"\(shares 64\+ chars with eval data: 84\); e.g. medqa-000000 ~ medqa-000000"):
        data.prepare(cfg)


def test_mixture_that_samples_nothing_names_the_weight():
    cfg = recipe.load("params/cpu-demo.yaml", {"dataset_mixture": [{"path": "bundled:medmcqa", "weight": 0.01}], "min_cot_chars": 0})
    with pytest.raises(MedcotError, match=r"the mixture step \(setting `dataset_mixture medmcqa: weight=0.01, max_samples=None`\)"):
        data.prepare(cfg)


def test_sources_with_no_usable_items_are_named(write):
    path = write("mcqa.jsonl", [{"question": "q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": None}] * 3)
    cfg = recipe.load("params/cpu-demo.yaml", {"dataset_mixture": [{"path": str(path)}], "min_cot_chars": 0})
    with pytest.raises(MedcotError, match=r"the training sources yielded no usable items \(mcqa .*read 3, kept 0, "
                                          r"skipped 3: no answer key"):
        data.prepare(cfg)


def test_saved_splits_round_trip(tmp_path):
    cfg = recipe.load("params/cpu-demo.yaml")
    prepared = data.prepare(cfg)
    data.save_prepared(prepared, tmp_path)
    loaded = data.load_prepared(tmp_path)
    assert loaded == prepared.splits
    with pytest.raises(MedcotError, match="run stage 00"):
        data.load_prepared(tmp_path / "elsewhere")
