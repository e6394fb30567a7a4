"""Every loader on every schema, with the quirks of the real files and malformed input."""

import json

import pytest

from medcot_lib.data import load_source, read_items
from medcot_lib.errors import MedcotError
from medcot_lib.recipe import DatasetSource


def load(path, **kw):
    return load_source(DatasetSource(path=str(path), **kw))


MEDQA_ROW = {
    "question": "A 30-year-old woman has fatigue and a ferritin of 5 ng/mL. What is the most likely diagnosis?",
    "answer": "Iron deficiency anemia",
    "options": {"A": "Iron deficiency anemia", "B": "Beta-thalassemia minor", "C": "Anemia of inflammation", "D": "Lead poisoning"},
    "meta_info": "step2&3",
    "answer_idx": "A",
}


@pytest.mark.parametrize(
    "name, fmt, minimum",
    [
        ("bundled:medical-o1", "medical_o1", 150),
        ("bundled:medical-o1-concise", "medical_o1", 200),
        ("bundled:medqa", "mcq", 80),
        ("bundled:pubmedqa", "pubmedqa", 40),
        ("bundled:medmcqa", "medmcqa", 8),
        ("bundled:medmcqa-converted", "mcq", 5),
        ("bundled:reasonmed", "reasonmed", 5),
        ("bundled:messages", "messages", 5),
        ("bundled:sharegpt", "sharegpt", 5),
    ],
)
def test_bundled_samples_load_with_detected_format(name, fmt, minimum):
    records, report = load(name)
    assert report.format == fmt
    assert len(records) >= minimum
    assert report.read == report.kept + sum(report.skipped.values())
    assert len({r.id for r in records}) == len(records)
    for r in records:
        assert r.question and r.answer
        if r.options:  # MedQA-style items answer with the option text; medical-o1 items with options keep their response
            assert r.gold in r.options and (r.answer == r.options[r.gold]) == (fmt != "medical_o1")


def test_bundled_cot_lengths_match_the_real_distribution():
    records, _ = load("bundled:medical-o1")
    cot = sorted(len(r.reasoning) for r in records)
    assert cot[0] >= 1000
    assert 1800 <= cot[len(cot) // 2] <= 2800  # real median is about 2,200 characters


def test_medqa_five_options_newlines_and_stray_quote(write):
    row = dict(MEDQA_ROW, question=MEDQA_ROW["question"] + '"', answer="Lead poisoning")
    row["options"] = {**row["options"], "D": "Lead\npoisoning", "E": "Sideroblastic anemia"}
    row["answer_idx"] = "D"
    records, report = load(write("medqa.jsonl", [row]))
    (r,) = records
    assert list(r.options) == ["A", "B", "C", "D", "E"]
    assert r.options["D"] == "Lead poisoning" and r.answer == "Lead poisoning" and r.gold == "D"
    assert r.question.endswith("diagnosis?")
    assert report.repaired == {"stray trailing quote removed": 1, "newline inside option joined": 1}


def test_medqa_quoted_question_is_left_alone(write):
    row = dict(MEDQA_ROW, question='He says "I feel tired." What is "it"?')
    (r,), report = load(write("medqa.jsonl", [row]))
    assert r.question == row["question"] and not report.repaired


def test_medqa_answer_text_must_match_answer_idx(write):
    row = dict(MEDQA_ROW, answer_idx="B")
    with pytest.raises(MedcotError, match=r"medqa.jsonl, line 1, field 'answer'"):
        load(write("medqa.jsonl", [row]))


def test_malformed_jsonl_names_file_and_line(write):
    path = write("bad.jsonl", json.dumps(MEDQA_ROW) + "\n" + json.dumps(MEDQA_ROW) + "\n{\"question\": oops}\n")
    with pytest.raises(MedcotError, match=r"bad.jsonl, line 3: not valid JSON"):
        load(path)


def test_malformed_json_array_names_line(write):
    good = json.dumps({"Question": "q", "Complex_CoT": "c", "Response": "r"})
    path = write("bad.json", f"[\n{good},\n{good},\n{{\"Question\": \"q\",, }}\n]\n")
    with pytest.raises(MedcotError, match=r"bad.json, line 4: not valid JSON"):
        load(path)


def test_truncated_json_array(write):
    path = write("cut.json", '[\n{"Question": "q", "Complex_CoT": "c", "Response": "r"},\n')
    with pytest.raises(MedcotError, match=r"cut.json, line \d+: not valid JSON"):
        load(path)


def test_missing_field_names_line_and_field(write):
    rows = [{"Question": "q1", "Complex_CoT": "c", "Response": "r"}, {"Question": "q2", "Complex_CoT": "c"}]
    path = write("o1.json", "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]")
    with pytest.raises(MedcotError, match=r"o1.json, line 3, field 'Response': missing field"):
        load(path)


def test_wrong_type_names_field(write):
    path = write("o1.json", json.dumps([{"Question": "q", "Complex_CoT": ["not", "text"], "Response": "r"}]))
    with pytest.raises(MedcotError, match=r"field 'Complex_CoT': wrong type list \(expected a non-empty string\)"):
        load(path)


@pytest.mark.parametrize("content", ["", "  \n\n", "[]", "{}"])
def test_empty_files_are_errors(write, content):
    with pytest.raises(MedcotError, match="empty|no items"):
        load(write("empty.json", content))


def test_unknown_schema_asks_for_format(write):
    with pytest.raises(MedcotError, match="cannot tell the schema.*set `format:`"):
        load(write("x.jsonl", [{"prompt": "a", "completion": "b"}]))


def test_pubmedqa_keyed_by_pmid_with_ground_truth_split(write):
    entry = {"QUESTION": "Does X help?", "CONTEXTS": ["We studied X.", "X helped."], "LABELS": ["METHODS", "RESULTS"],
             "MESHES": ["Humans"], "YEAR": "2015", "final_decision": "yes", "LONG_ANSWER": "X helped."}
    data = {"111": entry, "222": dict(entry, final_decision="no"), "333": dict(entry, final_decision="maybe")}
    path = write("ori_pqal.json", json.dumps(data))
    truth = write("test_ground_truth.json", json.dumps({"111": "yes", "333": "maybe"}))
    records, report = load(path, ground_truth=str(truth))
    assert [(r.id, r.gold) for r in records] == [("111", "yes"), ("333", "maybe")]
    assert records[0].context == "METHODS: We studied X.\nRESULTS: X helped."
    assert report.skipped == {"not in the ground-truth split": 1}
    with pytest.raises(MedcotError, match="disagrees with ground truth"):
        load(path, ground_truth=str(write("gt2.json", json.dumps({"111": "no"}))))
    with pytest.raises(MedcotError, match="1 ground-truth ids are absent"):
        load(path, ground_truth=str(write("gt3.json", json.dumps({"111": "yes", "999": "no"}))))


def test_pubmedqa_bad_decision_names_field(write):
    path = write("p.json", json.dumps({"1": {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "probably"}}))
    with pytest.raises(MedcotError, match=r"line 1, field 'final_decision'.*expected yes, no or maybe"):
        load(path)


def test_medmcqa_cop_is_one_based_and_unlabelled_rows_are_reported(write):
    row = {"id": "u1", "question": "Which vitamin deficiency causes scurvy?", "opa": "Vitamin C", "opb": "Vitamin D",
           "opc": "Vitamin K", "opd": "Thiamine", "cop": 1, "exp": "Ascorbate is needed for collagen.",
           "subject_name": "Biochemistry", "topic_name": "Vitamins", "choice_type": "single"}
    test_row = {k: v for k, v in row.items() if k not in ("cop", "exp")} | {"id": "u2"}
    records, report = load(write("medmcqa.json", json.dumps([row, dict(row, id="u3", cop=4), test_row])))
    assert [(r.id, r.gold, r.answer) for r in records] == [("u1", "A", "Vitamin C"), ("u3", "D", "Thiamine")]
    assert records[0].reasoning == "Ascorbate is needed for collagen."
    assert report.skipped == {"no answer key (cop absent, as in MedMCQA's test split)": 1}
    with pytest.raises(MedcotError, match=r"field 'cop'.*1-based"):
        load(write("m0.json", json.dumps([dict(row, cop=0)])))


def test_reasonmed_answer_parsed_from_output_and_failures_reported(write):
    instruction = ("Please answer the following multiple-choice question:\nWhich cell makes antibodies?\n"
                   "A. Plasma cell\nB. Neutrophil\nC. Platelet\nD. Erythrocyte")
    rows = [
        {"instruction": instruction, "input": "", "output": "B cells mature into plasma cells. Answer: A. Plasma cell"},
        {"instruction": instruction, "input": "", "output": "Neutrophils phagocytose; platelets clot.\n\nThe answer is (A)."},
        {"instruction": instruction, "input": "", "output": "It could be several of these cells, hard to say."},
    ]
    records, report = load(write("reasonmed.json", json.dumps(rows)))
    assert [r.gold for r in records] == ["A", "A"]
    assert records[0].question == "Which cell makes antibodies?" and records[0].options["D"] == "Erythrocyte"
    assert report.skipped == {"no answer letter could be read from the output": 1}


def test_chat_formats_split_reasoning_from_answer(write):
    msg = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Q?"},
                        {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nFinal."}]}
    share = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "No think block."}]}
    (m,), _ = load(write("m.jsonl", [msg]))
    (s,), _ = load(write("s.json", json.dumps([share])))
    assert (m.question, m.reasoning, m.answer) == ("Q?", "step one", "Final.")
    assert (s.reasoning, s.answer) == (None, "No think block.")
    with pytest.raises(MedcotError, match=r"field 'messages': needs a 'user' turn and a 'assistant' turn"):
        load(write("m2.jsonl", [{"messages": [{"role": "user", "content": "Q?"}]}]))


def test_explicit_format_overrides_detection(write):
    path = write("mcq.jsonl", [MEDQA_ROW])
    records, report = load(path, format="mcq")
    assert report.format == "mcq" and records[0].gold == "A"
    with pytest.raises(MedcotError, match="field 'Question': missing field"):
        load(path, format="medical_o1")


def test_json_file_holding_json_lines_is_read_as_lines(write):
    path = write("lines.json", json.dumps(MEDQA_ROW) + "\n" + json.dumps(MEDQA_ROW) + "\n")
    assert [line for line, _, _ in read_items(path)] == [1, 2]


def test_hub_dataset_unreachable_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MedcotError, match="could not be loaded from the Hugging Face Hub.*set `path:` to the local"):
        load("FreedomIntelligence/medical-o1-reasoning-SFT", config="en")


def test_one_line_object_keyed_by_id_is_not_mistaken_for_json_lines(write):
    entry = {"QUESTION": "Does X help?", "CONTEXTS": ["X helped."], "final_decision": "yes"}
    path = write("ori_pqal.json", json.dumps({"1": entry, "2": entry}) + "\n")
    assert [key for _, key, _ in read_items(path)] == ["1", "2"]


def test_malformed_ground_truth_names_file_and_line(write):
    entry = {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "yes"}
    path = write("p.json", json.dumps({"1": entry}))
    bad = write("gt.json", '{\n"1": "yes",\n"2": "perhaps"\n}')
    with pytest.raises(MedcotError, match=r"gt.json, line 3: entry 'perhaps' \(expected one JSON object"):
        load(path, ground_truth=str(bad))
    broken = write("gt2.json", '{\n"1": "yes",\n"2" "no"\n}')
    with pytest.raises(MedcotError, match=r"gt2.json, line 3: not valid JSON"):
        load(path, ground_truth=str(broken))


def test_pubmedqa_hub_rows_load_like_ori_pqal(write):
    row = {"pubid": 4242, "question": "Does X help?", "context": {"contexts": ["We studied X.", "X helped."],
           "labels": ["METHODS", "RESULTS"], "meshes": ["Humans"]}, "long_answer": "X helped.", "final_decision": "yes"}
    (r,), report = load(write("pqa_labeled.jsonl", [row]))
    assert report.format == "pubmedqa"
    assert (r.id, r.gold, r.answer) == ("4242", "yes", "X helped.")
    assert r.context == "METHODS: We studied X.\nRESULTS: X helped."


O1_ROW = {"Question": "A 25-year-old has a ferritin of 5 ng/mL. What is the most likely diagnosis?",
          "Complex_CoT": "A very low ferritin means depleted iron stores.", "Response": "Iron stores are depleted."}


def test_medical_o1_items_with_options_become_multiple_choice(write):
    row = dict(O1_ROW, options={"A": "Iron deficiency", "B": "Thalassemia trait"}, answer_idx="A")
    (record,), report = load(write("o1.json", json.dumps([row])))
    assert report.format == "medical_o1" and record.options == {"A": "Iron deficiency", "B": "Thalassemia trait"}
    assert record.gold == "A" and record.answer == "Iron stores are depleted." and record.reasoning == O1_ROW["Complex_CoT"]


@pytest.mark.parametrize("extra", [{"options": "A. Iron deficiency\nB. Thalassemia trait", "answer_idx": "A"},
                                   {"options": {"A": "Iron deficiency"}, "answer_idx": "C"},
                                   {"options": {"A": "Iron deficiency"}}])
def test_medical_o1_options_in_other_shapes_stay_open_ended_and_are_counted(write, extra):
    (record,), report = load(write("o1.json", json.dumps([dict(O1_ROW, **extra)])))
    assert record.options is None and record.gold is None and record.answer == O1_ROW["Response"]
    assert sum(report.repaired.values()) == 1 and "read as open-ended" in next(iter(report.repaired))


def test_concise_sample_is_short_balanced_and_shaped_like_the_eval_prompts():
    records, _ = load("bundled:medical-o1-concise")
    words = sorted(len(r.reasoning.split()) for r in records)
    assert 60 <= words[0] and words[-1] <= 150  # issue 12: reasoning of about 60-150 words
    mcq = [r for r in records if r.options]
    assert 80 <= len(mcq) <= len(records) - 80  # both shapes are trained: open questions and multiple choice
    letters = [r.gold for r in mcq]
    assert max(letters.count(x) for x in "ABCD") - min(letters.count(x) for x in "ABCD") <= 5  # no letter bias to learn
    assert all(list(r.options) == list("ABCD") and "answer is" not in r.answer.lower() for r in mcq)


def test_latin1_bytes_name_file_line_field_and_offset(tmp_path):
    path = tmp_path / "o1.jsonl"
    good = json.dumps({"Question": "q", "Complex_CoT": "c", "Response": "r"}).encode()
    path.write_bytes(good + b'\n{"Question": "Caf\xe9 au lait spots?", "Complex_CoT": "c", "Response": "r"}\n')
    offset = len(good) + 1 + len('{"Question": "Caf')
    with pytest.raises(MedcotError, match=rf"o1.jsonl, line 2, field 'Question': not valid UTF-8: byte 0xe9 at byte offset "
                                          rf"{offset} \(column 18\).*\(expected UTF-8 text"):
        load(path)


def test_random_bytes_are_a_clear_error_not_a_traceback(tmp_path):
    path = tmp_path / "noise.json"
    path.write_bytes(bytes([0x9E, 0xFF, 0x00, 0x80]) * 64)
    with pytest.raises(MedcotError, match=r"noise.json, line 1: not valid UTF-8: byte 0x9e at byte offset 0"):
        load(path)


def test_utf8_with_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"Question": "Caf\u00e9?", "Complex_CoT": "c", "Response": "r"}]).encode())
    records, _ = load(path)
    assert records[0].question == "Caf\u00e9?"


def test_non_utf8_ground_truth_names_its_file(write, tmp_path):
    data = write("ori_pqal.json", json.dumps({"1": {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "yes"}}))
    truth = tmp_path / "test_ground_truth.json"
    truth.write_bytes(b'{"1": "y\xe8s"}')
    with pytest.raises(MedcotError, match=r"test_ground_truth.json, line 1, field '1': not valid UTF-8"):
        load(data, ground_truth=str(truth))
