"""Prompt formatting: one function renders a record for training and for inference.

The training sequence of a record is, token for token, its inference prompt followed by its
target. Both come from `render`, so they cannot drift apart; a mismatch between training and
inference templates is the most common reason a fine-tuned GGUF answers garbage.

Styles:
  think        the model's own chat template, a system prompt asking for <think>...</think>
               reasoning, and the target "<think>\\nCOT\\n</think>\\n\\nANSWER" + end of turn.
  native       the model's own thinking template (Qwen3 `enable_thinking`, DeepSeek-R1-Distill
               templates that pre-fill "<think>"); no system prompt unless the recipe gives one.
  instruction  plain "### Question / ### Response" text without a chat template, as in the
               DeepSeek-R1 + Unsloth notebooks; the target ends with the EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import Record
from .errors import MedcotError

THINK_SYSTEM_PROMPT = (
    "You are a medical reasoning assistant for education and research. First reason step by step "
    "inside <think> and </think>, then give a concise final answer."
)

INSTRUCTION_HEADER = (
    "The task below is a medical question. Reason through it step by step inside <think> and "
    "</think> before writing the answer, and keep the answer consistent with the reasoning."
)

# Showcase questions (stages 01, 04 and 05 ask them), written for medcot, covering the seed projects' teaching themes. Educational only.
SHOWCASE_QUESTIONS = {
    "showcase-macrocytic-anemia":
        "A 68-year-old woman has fatigue and tingling in both feet. Her hemoglobin is 9.4 g/dL and MCV 114 fL, "
        "and the smear shows hypersegmented neutrophils. How should this macrocytic anemia be worked up, and "
        "what is the most likely cause?",
    "showcase-hemolytic-transfusion-reaction":
        "Ten minutes into a red cell transfusion after hip surgery, a 72-year-old man develops fever, chills, "
        "flank pain and hypotension, and his urine turns dark. What is happening, and what should be done right away?",
    "showcase-iron-deficiency-vs-chronic-disease":
        "A 58-year-old man with rheumatoid arthritis has a hemoglobin of 10.1 g/dL and an MCV of 78 fL. Ferritin is "
        "85 ng/mL and transferrin saturation 9%. How do you tell iron deficiency from anemia of chronic disease "
        "here, and which test would settle it?",
    "showcase-inferior-stemi":
        "A 61-year-old man has chest pain with ST elevation in leads II, III and aVF, and his blood pressure falls "
        "after sublingual nitroglycerin. Which artery is most likely occluded, and why did the nitrate cause hypotension?",
    "showcase-alcohol-macrocytosis":
        "A 49-year-old man who drinks heavily has an MCV of 104 fL, a normal hemoglobin, and normal vitamin B12 and "
        "folate levels. What explains the macrocytosis, and what would you expect if he stops drinking?",
}
SHOWCASE = [Record(id=key, source="showcase", question=text, answer="") for key, text in SHOWCASE_QUESTIONS.items()]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_SENTINEL = "\u2063MEDCOT-END-OF-TURN\u2063"


def user_message(record: Record) -> str:
    """What the user asks: context, question, options, and how to state the answer."""
    parts = []
    if record.context:
        parts.append(f"Context:\n{record.context}")
    parts.append(record.question)
    if record.options:
        parts.append("Options:\n" + "\n".join(f"{k}. {v}" for k, v in record.options.items()))
        parts.append("Finish with: The answer is (X).")
    elif record.gold in ("yes", "no", "maybe"):
        parts.append("Answer yes, no or maybe. Finish with: The answer is yes/no/maybe.")
    return "\n\n".join(parts)


def final_answer(record: Record) -> str:
    """The answer text a trained model should end with."""
    if record.options and record.gold:
        stated = f"The answer is ({record.gold}) {record.options[record.gold]}."
        # MedQA-style items carry the option text as their answer; medical-o1 items with options carry a
        # response, which comes first so the answer statement stays last (where evaluation reads it).
        return stated if record.answer == record.options[record.gold] else f"{record.answer}\n\n{stated}"
    if record.gold in ("yes", "no", "maybe") and not record.options:
        return f"{record.answer}\n\nThe answer is {record.gold}."
    return record.answer


def assistant_message(record: Record) -> str:
    """Reasoning in a think block, then the final answer (no think block without reasoning)."""
    answer = final_answer(record)
    if not record.reasoning:
        return answer
    return f"{THINK_OPEN}\n{record.reasoning}\n{THINK_CLOSE}\n\n{answer}"


@dataclass(frozen=True)
class Rendered:
    prompt: str  # what inference feeds the model
    target: str  # what training teaches it to continue with (empty at inference)
    add_special_tokens: bool  # whether the tokenizer should add BOS itself (only without a chat template)

    @property
    def text(self) -> str:
        return self.prompt + self.target


@dataclass(frozen=True)
class PromptStyle:
    name: str
    system_prompt: str | None
    template_kwargs: dict

    @classmethod
    def from_recipe(cls, cfg) -> PromptStyle:
        system = cfg.system_prompt
        if system is None and cfg.prompt_style == "think":
            system = THINK_SYSTEM_PROMPT
        kwargs = {"enable_thinking": True} if cfg.prompt_style == "native" else {}
        return cls(cfg.prompt_style, system, kwargs)


def _chat(style: PromptStyle, record: Record) -> list[dict]:
    messages = [{"role": "system", "content": style.system_prompt}] if style.system_prompt else []
    return messages + [{"role": "user", "content": user_message(record)}]


def _apply(tokenizer, messages: list[dict], style: PromptStyle, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **style.template_kwargs)


def end_of_turn(tokenizer, style: PromptStyle) -> str:
    """What the chat template writes after an assistant message (e.g. '<|im_end|>\\n')."""
    probe = Record(id="probe", source="probe", question="q", answer="a")
    full = _apply(tokenizer, _chat(style, probe) + [{"role": "assistant", "content": _SENTINEL}], style, False)
    if _SENTINEL not in full:
        raise MedcotError("the chat template drops assistant content; cannot derive its end-of-turn marker")
    return full.split(_SENTINEL, 1)[1]


def render(record: Record, tokenizer, style: PromptStyle, *, with_target: bool = True) -> Rendered:
    """Render one record as an inference prompt and (for training) its target."""
    if style.name == "instruction":
        prompt = f"{INSTRUCTION_HEADER}\n\n### Question:\n{user_message(record)}\n\n### Response:\n"
        target = assistant_message(record) + tokenizer.eos_token if with_target else ""
        return Rendered(prompt, target, add_special_tokens=True)
    if not getattr(tokenizer, "chat_template", None):
        raise MedcotError(f"prompt_style '{style.name}' needs a chat template, and this tokenizer has none; use prompt_style: instruction")
    prompt = _apply(tokenizer, _chat(style, record), style, True)
    if not with_target:
        return Rendered(prompt, "", add_special_tokens=False)
    content = assistant_message(record)
    # A template that pre-fills "<think>\n" in the generation prompt: the target continues after it.
    if prompt.rstrip("\n").endswith(THINK_OPEN) and content.startswith(THINK_OPEN):
        content = content[len(THINK_OPEN):].lstrip("\n") if prompt.endswith("\n") else content[len(THINK_OPEN):]
    return Rendered(prompt, content + end_of_turn(tokenizer, style), add_special_tokens=False)


def encode(rendered: Rendered, tokenizer) -> dict[str, list[int]]:
    """Token ids of prompt + target, and a mask that is 1 on target (completion) tokens only.

    Prompt and target are tokenized separately and concatenated, so the training sequence starts
    with exactly the ids inference feeds the model, whatever the tokenizer does at the seam.
    """
    prompt_ids = tokenizer(rendered.prompt, add_special_tokens=rendered.add_special_tokens)["input_ids"]
    target_ids = tokenizer(rendered.target, add_special_tokens=False)["input_ids"] if rendered.target else []
    return {"input_ids": prompt_ids + target_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(target_ids)}


def token_lengths(records: list[Record], tokenizer, style: PromptStyle) -> list[int]:
    """Length in tokens of each record's full training sequence."""
    return [len(encode(render(r, tokenizer, style), tokenizer)["input_ids"]) for r in records]


def length_stats(lengths: list[int], max_length: int, model_max: int | None = None) -> dict:
    """Median, p95, max of sequence lengths, and a recommended max_length.

    The recommendation covers 99% of sequences, rounded up to a multiple of 64 (tensor-friendly
    shapes), and never exceeds the model's context window.
    """
    import numpy as np

    values = np.asarray(lengths)
    p99 = float(np.percentile(values, 99))
    recommended = int(-(-p99 // 64) * 64)
    if model_max:
        recommended = min(recommended, model_max)
    return {
        "n": int(values.size),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "p99": p99,
        "max": int(values.max()),
        "recommended_max_length": recommended,
        "truncated_at_recommended": int((values > recommended).sum()),
        "max_length": max_length,
        "truncated_at_max_length": int((values > max_length).sum()),
    }


def _describe(values: list[int]) -> dict:
    import numpy as np

    array = np.asarray(values)
    return {"median": float(np.median(array)), "p95": float(np.percentile(array, 95)), "max": int(array.max())}


def generation_budget(records: list[Record], tokenizer, style: PromptStyle) -> dict:
    """Token lengths of what a trained model should write (reasoning, and the whole target), and a max_new_tokens
    that lets it finish: the target's 99th percentile rounded up to a multiple of 32."""
    import numpy as np

    targets = [render(r, tokenizer, style).target for r in records]
    target_tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets]
    reasoning = [len(tokenizer(r.reasoning, add_special_tokens=False)["input_ids"]) for r in records if r.reasoning]
    return {"n": len(records), "reasoning_tokens": _describe(reasoning) if reasoning else None,
            "target_tokens": _describe(target_tokens),
            "recommended_max_new_tokens": int(-(-np.percentile(target_tokens, 99) // 32) * 32)}
