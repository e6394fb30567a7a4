"""Answer extraction on outputs written to look like real model behaviour.

Each row is (output, expected answer, expected status). None is never dropped: it is counted wrong.
"""

import pytest

from medcot_lib.answers import (
    Extraction,
    extract,
    extract_choice,
    extract_decision,
    final_part,
    split_think,
    well_formed,
)

ANEMIA = {"A": "Iron deficiency anemia", "B": "Vitamin B12 deficiency", "C": "Folate deficiency",
          "D": "Anemia of chronic disease"}
# "Iron deficiency" is a substring of "Iron deficiency anemia".
MICROCYTIC = {"A": "Iron deficiency", "B": "Iron deficiency anemia", "C": "Beta-thalassemia trait", "D": "Lead poisoning"}
TRANSFUSION = {"A": "Febrile non-hemolytic transfusion reaction", "B": "Acute hemolytic transfusion reaction",
               "C": "Transfusion-related acute lung injury", "D": "Anaphylactic transfusion reaction",
               "E": "Transfusion-associated circulatory overload"}
UTI = {"A": "Klebsiella pneumoniae", "B": "E. coli", "C": "Proteus mirabilis", "D": "Enterococcus faecalis"}
LIVER = {"A": "Autoimmune hepatitis", "B": "Hepatitis C", "C": "Wilson disease", "D": "Primary biliary cholangitis"}

OPTIONS_LIST = "A. Iron deficiency anemia\nB. Vitamin B12 deficiency\nC. Folate deficiency\nD. Anemia of chronic disease"

CHOICES = [
    # --- where the answer is read from
    pytest.param("<think>\nLow MCV would suggest (A) iron deficiency, but the MCV is 112 and there is loss of vibration "
                 "sense.\n</think>\n\nThe answer is (B) Vitamin B12 deficiency.", ANEMIA, "B", "ok", id="reasoning-letter-ignored"),
    pytest.param("<think>\nThe answer is (C) at first glance, but neuropathy means B12.\n</think>\n\nThe answer is (B).",
                 ANEMIA, "B", "ok", id="reasoning-statement-ignored"),
    pytest.param("The answer is (B) Vitamin B12 deficiency.", ANEMIA, "B", "ok", id="letter-and-text"),
    pytest.param("Macrocytosis with neuropathy.\n</think>\n\nThe answer is (C).", ANEMIA, "C", "ok", id="prefilled-think"),
    pytest.param("## Thinking\nHypersegmented neutrophils, MCV 118, absent ankle reflexes...\n\n## Final Response\n"
                 "The answer is (B).", ANEMIA, "B", "ok", id="huatuo-sections"),
    pytest.param("## Thinking\nFever and flank pain one hour into the transfusion, so I suspect (B)", TRANSFUSION,
                 None, "truncated", id="huatuo-truncated"),
    pytest.param("<think>\nHypotension, hemoglobinuria, back pain: the answer is probably (B", TRANSFUSION, None,
                 "truncated", id="think-truncated"),
    pytest.param("<think>\nMacrocytic anemia.\n</think>\n\n", ANEMIA, None, "unparsed", id="closed-think-no-answer"),
    pytest.param("", ANEMIA, None, "empty", id="empty"),
    pytest.param("  \n\t\n ", ANEMIA, None, "empty", id="whitespace-only"),
    pytest.param("The answer is (B).<|im_end|>", ANEMIA, "B", "ok", id="trailing-im-end"),
    pytest.param("The answer is (B).<|im_end|>\n<|im_start|>user\nNext question... The answer is (C).", ANEMIA, "B", "ok",
                 id="hallucinated-next-turn-cut"),
    # --- explicit statements, in the forms models write them
    pytest.param("the answer is (c)", ANEMIA, "C", "ok", id="lowercase-statement"),
    pytest.param("Answer: (c)", ANEMIA, "C", "ok", id="answer-colon-paren"),
    pytest.param("**Answer:** C", ANEMIA, "C", "ok", id="markdown-answer"),
    pytest.param("Folate lacks the neurological findings.\n\n**Final Answer: (D)**", ANEMIA, "D", "ok", id="markdown-final-answer"),
    pytest.param("Answer:\nB", ANEMIA, "B", "ok", id="answer-next-line"),
    pytest.param("The correct option is B.", ANEMIA, "B", "ok", id="correct-option-is"),
    pytest.param("Option D is correct.", ANEMIA, "D", "ok", id="option-d-is-correct"),
    pytest.param("Option A is incorrect because the MCV is high. So, D is the best answer.", ANEMIA, "D", "ok",
                 id="so-d-is-best"),
    pytest.param("I would choose B.", ANEMIA, "B", "ok", id="i-would-choose"),
    pytest.param("The answer is B because the neurological findings rule out folate deficiency.", ANEMIA, "B", "ok",
                 id="letter-because"),
    pytest.param("Therefore, the final answer is $\\boxed{C}$.", ANEMIA, "C", "ok", id="boxed"),
    pytest.param("answer: a) iron deficiency anemia", ANEMIA, "A", "ok", id="lowercase-label-and-text"),
    pytest.param("I think it's B, but actually the answer is D.", ANEMIA, "D", "ok", id="last-explicit-statement"),
    pytest.param("The answer is (C). Wait, folate deficiency does not cause subacute combined degeneration. "
                 "The answer is (B).", ANEMIA, "B", "ok", id="self-correction"),
    pytest.param("The most likely diagnosis is folate deficiency.", ANEMIA, "C", "ok", id="most-likely-diagnosis-text"),
    # --- option text without a letter
    pytest.param("Vitamin B12 deficiency", ANEMIA, "B", "ok", id="text-exact"),
    pytest.param("vitamin b12 deficiency.", ANEMIA, "B", "ok", id="text-case-and-period"),
    pytest.param("**Folate Deficiency!**", ANEMIA, "C", "ok", id="text-markdown-punctuation"),
    pytest.param("The answer is acute hemolytic transfusion reaction", TRANSFUSION, "B", "ok", id="statement-with-text"),
    pytest.param("Transfusion related acute lung injury", TRANSFUSION, "C", "ok", id="text-hyphen-normalised"),
    pytest.param("The answer is E. coli.", UTI, "B", "ok", id="text-that-starts-like-a-letter"),
    pytest.param("Iron deficiency anemia.", MICROCYTIC, "B", "ok", id="substring-longer-option"),
    pytest.param("Iron deficiency", MICROCYTIC, "A", "ok", id="substring-shorter-option"),
    pytest.param("The answer is iron deficiency anemia.", MICROCYTIC, "B", "ok", id="substring-statement-longer"),
    pytest.param("The answer is iron deficiency, not yet anemia.", MICROCYTIC, "A", "ok", id="substring-statement-shorter"),
    # --- lone labels
    pytest.param("C.", ANEMIA, "C", "ok", id="lone-letter-period"),
    pytest.param("(B)", ANEMIA, "B", "ok", id="lone-letter-parens"),
    pytest.param("C. Folate deficiency", ANEMIA, "C", "ok", id="label-with-its-text"),
    pytest.param("Both fit, but the neuropathy decides it.\n\nB", ANEMIA, "B", "ok", id="lone-letter-last-line"),
    # --- no answer, or several: None, never a guess
    pytest.param("The answer is A or C.", ANEMIA, None, "ambiguous", id="statement-two-letters"),
    pytest.param("A or C", ANEMIA, None, "ambiguous", id="lone-two-letters"),
    pytest.param("The answer is (A) and (C).", ANEMIA, None, "ambiguous", id="statement-and"),
    pytest.param(OPTIONS_LIST, ANEMIA, None, "ambiguous", id="options-list-repeated"),
    pytest.param(OPTIONS_LIST + "\n\nThe answer is (B).", ANEMIA, "B", "ok", id="options-list-then-statement"),
    pytest.param("B. Folate deficiency", ANEMIA, None, "ambiguous", id="label-and-text-disagree"),
    pytest.param("The answer is E.", ANEMIA, None, "unparsed", id="letter-not-an-option"),
    pytest.param("E", ANEMIA, None, "unparsed", id="lone-letter-not-an-option"),
    pytest.param("The answer is E.", TRANSFUSION, "E", "ok", id="letter-e-of-five"),
    pytest.param("The answer is a deficiency of intrinsic factor, which blocks absorption.", ANEMIA, None, "unparsed",
                 id="article-a-is-not-option-a"),
    pytest.param("the answer is a Type II hypersensitivity reaction", TRANSFUSION, None, "unparsed",
                 id="article-before-capital"),
    pytest.param("The answer is not B.", ANEMIA, None, "unparsed", id="negated-statement"),
    pytest.param("It is not folate deficiency.", ANEMIA, None, "unparsed", id="negated-mention-not-an-answer"),
    pytest.param("Iron deficiency gives a low MCV. Folate deficiency lacks neuropathy. Vitamin B12 deficiency fits "
                 "both findings.", ANEMIA, None, "unparsed", id="rambling-mentions-only"),
    pytest.param("Chronic hepatitis B is the most likely cause of his cirrhosis.", LIVER, None, "unparsed",
                 id="hepatitis-b-is-not-option-b"),
]


@pytest.mark.parametrize("output, options, answer, status", CHOICES)
def test_extract_choice(output, options, answer, status):
    result = extract(output, options=options)
    assert (result.answer, result.status) == (answer, status)
    assert extract_choice(output, options) == answer


DECISIONS = [
    pytest.param("The answer is yes.", "yes", "ok", id="statement-yes"),
    pytest.param("Answer: no", "no", "ok", id="answer-colon-no"),
    pytest.param("Final answer: maybe", "maybe", "ok", id="final-answer-maybe"),
    pytest.param("**Answer:** Yes", "yes", "ok", id="markdown-answer"),
    pytest.param("maybe", "maybe", "ok", id="lone-maybe"),
    pytest.param("NO.", "no", "ok", id="uppercase-no"),
    pytest.param("**Maybe**", "maybe", "ok", id="bold-maybe"),
    pytest.param("Yes, perioperative beta-blockade reduced 30-day cardiac events in this cohort.", "yes", "ok",
                 id="leading-yes-committed"),
    pytest.param("Maybe. The trial was underpowered for mortality.", "maybe", "ok", id="leading-maybe"),
    pytest.param("No, there is no evidence that vitamin D supplementation lowered fracture rates.", "no", "ok",
                 id="leading-no-with-incidental-no"),
    pytest.param("There is no evidence of harm and mortality fell by a third. The answer is yes.", "yes", "ok",
                 id="incidental-no-then-statement"),
    pytest.param("Yes, at first sight, but the effect vanished after adjustment. The answer is no.", "no", "ok",
                 id="statement-overrides-leading-word"),
    pytest.param("<think>\nThe abstract says yes for the primary endpoint...\n</think>\n\nThe answer is no.", "no", "ok",
                 id="reasoning-ignored"),
    pytest.param("The answer is maybe.<|im_end|>", "maybe", "ok", id="trailing-im-end"),
    pytest.param("yes or no cannot be determined from this abstract", None, "unparsed", id="yes-or-no-undetermined"),
    pytest.param("The data show no difference in mortality between the arms.", None, "unparsed", id="incidental-no-only"),
    pytest.param("Nonetheless, the authors acknowledge this is not known.", None, "unparsed", id="words-inside-words"),
    pytest.param("The answer is not clear from the abstract.", None, "unparsed", id="answer-is-not"),
    pytest.param("Yes. However, in the subgroup over 75 years, no.", None, "ambiguous", id="yes-and-no"),
    pytest.param("Finish with: The answer is yes/no/maybe.", None, "ambiguous", id="instruction-echoed"),
    pytest.param("<think>\nThe cohort was small, so", None, "truncated", id="truncated"),
    pytest.param("", None, "empty", id="empty"),
]


@pytest.mark.parametrize("output, answer, status", DECISIONS)
def test_extract_decision(output, answer, status):
    result = extract(output, decision=True)
    assert (result.answer, result.status) == (answer, status)
    assert extract_decision(output) == answer


WELL_FORMED = [
    pytest.param("<think>\nMCV 112, neuropathy.\n</think>\n\nThe answer is (B).", False, True, id="think-block"),
    pytest.param("<think>\nMCV 112.\n</think>\n\nThe answer is (B).<|im_end|>", False, True, id="trailing-end-token"),
    pytest.param("MCV 112, neuropathy.\n</think>\n\nThe answer is (B).", True, True, id="prefilled"),
    pytest.param("MCV 112, neuropathy.\n</think>\n\nThe answer is (B).", False, False, id="missing-open-not-prefilled"),
    pytest.param("<think>\nMCV 112.\n</think>\n\nThe answer is (B).", True, False, id="open-repeated-when-prefilled"),
    pytest.param("<think>\n\n</think>\n\nThe answer is (B).", False, False, id="empty-reasoning"),
    pytest.param("<think>\nMCV 112.\n</think>\n\n", False, False, id="empty-final"),
    pytest.param("<think>\nMCV 112, neuropathy, so", False, False, id="truncated"),
    pytest.param("The answer is (B).", False, False, id="no-reasoning-block"),
    pytest.param("Sure! <think>\nMCV 112.\n</think>\nThe answer is (B).", False, False, id="text-before-think"),
    pytest.param("<think>a</think>The answer is (C).<think>b</think>The answer is (B).", False, False, id="two-blocks"),
    pytest.param("## Thinking\nMCV 112.\n\n## Final Response\nThe answer is (B).", False, True, id="huatuo"),
    pytest.param("## Thinking\nMCV 112, neuropathy, so", False, False, id="huatuo-truncated"),
]


@pytest.mark.parametrize("output, prefilled, expected", WELL_FORMED)
def test_well_formed(output, prefilled, expected):
    assert well_formed(output, prefilled_think=prefilled) is expected


def test_extraction_keeps_reasoning_and_final_part():
    result = extract("<think>\nMCV 112.\n</think>\n\nThe answer is (B).", options=ANEMIA)
    assert result == Extraction(reasoning="MCV 112.", final="The answer is (B).", answer="B", status="ok")


def test_open_question_answer_is_the_final_part():
    assert extract("<think>\nMCV 112.\n</think>\n\nStart intramuscular hydroxocobalamin.").answer == (
        "Start intramuscular hydroxocobalamin.")
    assert extract("<think>\nMCV 112.\n</think>\n\n").status == "unparsed"
    assert extract("<think>\nMCV 112, so").status == "truncated"


def test_extract_takes_one_question_kind():
    with pytest.raises(ValueError, match="not both"):
        extract("The answer is (B).", options=ANEMIA, decision=True)


def test_split_think_final_part_never_holds_reasoning():
    assert split_think("<think>\nstep one\n</think>\n\nFinal.") == ("step one", "Final.")
    assert split_think("No think block.") == (None, "No think block.")
    assert split_think("<think>\ncut off") == ("cut off", "")
    # A second think block belongs to the reasoning: the final part follows the last '</think>'.
    assert final_part("<think>a</think>The answer is (C).<think>b</think>The answer is (B).") == "The answer is (B)."
