"""Training text == inference prompt + target, token for token, for every template style."""

import copy

import pytest

from medcot_lib import prompts
from medcot_lib.data import Record, load_source
from medcot_lib.errors import MedcotError
from medcot_lib.recipe import DatasetSource

# Our own minimal templates reproducing two behaviours of real thinking models:
# a generation prompt that pre-fills "<think>\n" and drops reasoning from rendered assistant turns
# (as DeepSeek-R1-Distill templates do), and an `enable_thinking` switch (as Qwen3 templates have).
PREFILL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'].split('</think>')[-1] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
SWITCH_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


class Cfg:
    def __init__(self, prompt_style, system_prompt=None):
        self.prompt_style, self.system_prompt = prompt_style, system_prompt


def sample_records():
    cot, _ = load_source(DatasetSource(path="bundled:medical-o1"))
    mcq, _ = load_source(DatasetSource(path="bundled:medqa"))
    pqa, _ = load_source(DatasetSource(path="bundled:pubmedqa"))
    no_cot = Record(id="n", source="s", question="What does a low haptoglobin suggest?", answer="Intravascular hemolysis.")
    return [cot[0], cot[57], mcq[0], mcq[-1], pqa[0], no_cot]


CASES = [("think", None), ("native", None), ("instruction", None), ("native", PREFILL_TEMPLATE),
         ("think", PREFILL_TEMPLATE), ("native", SWITCH_TEMPLATE)]


@pytest.fixture(scope="module")
def records():
    return sample_records()


def with_template(tokenizer, template):
    if template is None:
        return tokenizer
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


@pytest.mark.parametrize("style_name, template", CASES)
def test_training_ids_are_inference_ids_plus_target_ids(tokenizer, records, style_name, template):
    tok = with_template(tokenizer, template)
    style = prompts.PromptStyle.from_recipe(Cfg(style_name))
    for record in records:
        train = prompts.render(record, tok, style)
        infer = prompts.render(record, tok, style, with_target=False)
        assert train.prompt == infer.prompt and infer.target == ""
        encoded = prompts.encode(train, tok)
        inference_ids = tok(infer.prompt, add_special_tokens=infer.add_special_tokens)["input_ids"]
        target_ids = tok(train.target, add_special_tokens=False)["input_ids"]
        assert encoded["input_ids"] == inference_ids + target_ids
        # The seam does not merge tokens: tokenizing the whole text gives the same ids.
        assert tok(train.text, add_special_tokens=train.add_special_tokens)["input_ids"] == encoded["input_ids"]
        # The loss mask covers exactly the target: reasoning, answer and end of turn.
        masked = [i for i, m in zip(encoded["input_ids"], encoded["completion_mask"], strict=True) if m]
        assert tok.decode(masked) == train.target
        assert encoded["completion_mask"] == [0] * len(inference_ids) + [1] * len(target_ids)


def test_think_style_matches_the_models_own_chat_template(tokenizer, records):
    style = prompts.PromptStyle.from_recipe(Cfg("think"))
    for record in records:
        rendered = prompts.render(record, tokenizer, style)
        messages = [{"role": "system", "content": prompts.THINK_SYSTEM_PROMPT},
                    {"role": "user", "content": prompts.user_message(record)},
                    {"role": "assistant", "content": prompts.assistant_message(record)}]
        assert rendered.text == tokenizer.apply_chat_template(messages, tokenize=False)
        assert rendered.target.endswith("<|im_end|>\n")
        if record.reasoning:
            assert rendered.target.startswith("<think>\n" + record.reasoning + "\n</think>\n\n")


def test_prefilled_think_is_not_repeated_in_the_target(tokenizer, records):
    tok = with_template(tokenizer, PREFILL_TEMPLATE)
    rendered = prompts.render(records[0], tok, prompts.PromptStyle.from_recipe(Cfg("native")))
    assert rendered.prompt.endswith("<|Assistant|><think>\n")
    assert rendered.target.startswith(records[0].reasoning)
    assert "<think>" not in rendered.target and rendered.target.endswith("<|end|>")


def test_native_style_asks_for_thinking(tokenizer, records):
    tok = with_template(tokenizer, SWITCH_TEMPLATE)
    rendered = prompts.render(records[0], tok, prompts.PromptStyle.from_recipe(Cfg("native")))
    assert rendered.prompt.endswith("<|im_start|>assistant\n")  # thinking on: nothing pre-filled
    assert not rendered.prompt.startswith("<|im_start|>system")  # native adds no system prompt of its own


def test_instruction_style_uses_question_and_response_headings(tokenizer, records):
    rendered = prompts.render(records[2], tokenizer, prompts.PromptStyle.from_recipe(Cfg("instruction")))
    assert "### Question:\n" in rendered.prompt and rendered.prompt.endswith("### Response:\n")
    assert "<|im_start|>" not in rendered.prompt
    assert rendered.target.endswith("The answer is (" + records[2].gold + ") " + records[2].answer + "." + tokenizer.eos_token)


def test_user_message_shows_context_options_and_answer_format(records):
    mcq, pqa = records[2], records[4]
    text = prompts.user_message(mcq)
    assert all(f"{k}. {v}" in text for k, v in mcq.options.items()) and text.endswith("The answer is (X).")
    assert prompts.user_message(pqa).startswith("Context:\n") and "yes, no or maybe" in prompts.user_message(pqa)
    assert prompts.final_answer(pqa).endswith(f"The answer is {pqa.gold}.")


def test_chat_styles_need_a_chat_template(tokenizer, records):
    tok = with_template(tokenizer, None)
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    with pytest.raises(MedcotError, match="needs a chat template.*prompt_style: instruction"):
        prompts.render(records[0], tok, prompts.PromptStyle.from_recipe(Cfg("think")))


def test_length_stats_recommend_a_multiple_of_64():
    stats = prompts.length_stats(list(range(100, 1100, 10)), max_length=512, model_max=8192)
    assert stats["recommended_max_length"] % 64 == 0 and stats["recommended_max_length"] >= stats["p99"]
    assert stats["truncated_at_max_length"] == sum(v > 512 for v in range(100, 1100, 10))


def test_a_medical_o1_item_with_options_is_trained_on_the_eval_prompt_and_ends_with_the_answer_statement(tokenizer):
    style = prompts.PromptStyle.from_recipe(Cfg("think"))
    options = {"A": "Iron deficiency", "B": "Thalassemia trait", "C": "Lead poisoning", "D": "Anemia of inflammation"}
    item = Record(id="x", source="s", question="Ferritin is 5 ng/mL. Which diagnosis is most likely?", reasoning="Stores are empty.",
                  answer="Depleted stores mean iron deficiency.", options=options, gold="A")
    mcq = Record(id="y", source="s", question=item.question, answer="Iron deficiency", options=options, gold="A")
    rendered = prompts.render(item, tokenizer, style)
    assert rendered.prompt == prompts.render(mcq, tokenizer, style, with_target=False).prompt  # the eval prompt, options included
    assert "Finish with: The answer is (X)." in rendered.prompt
    assert prompts.final_answer(item) == "Depleted stores mean iron deficiency.\n\nThe answer is (A) Iron deficiency."
    assert prompts.final_answer(mcq) == "The answer is (A) Iron deficiency."
    assert rendered.target.startswith("<think>\nStores are empty.\n</think>\n\nDepleted stores")


def test_generation_budget_covers_what_training_teaches(tokenizer):
    style = prompts.PromptStyle.from_recipe(Cfg("think"))
    cot, _ = load_source(DatasetSource(path="bundled:medical-o1-concise"))
    budget = prompts.generation_budget(cot, tokenizer, style)
    targets = [len(tokenizer(prompts.render(r, tokenizer, style).target, add_special_tokens=False)["input_ids"]) for r in cot]
    assert budget["n"] == len(cot) and budget["target_tokens"]["max"] == max(targets)
    assert budget["reasoning_tokens"]["p95"] < budget["target_tokens"]["p95"] <= budget["recommended_max_new_tokens"]
    assert budget["recommended_max_new_tokens"] % 32 == 0
