"""Reading a final answer out of free text.

Used to recover answer letters from sources that have none (ReasonMed), and by the evaluation
and distillation stages. The reasoning part is never searched: only the final part counts.
"""

from __future__ import annotations

import re


def split_think(text: str) -> tuple[str | None, str]:
    """Split '<think>reasoning</think> answer' into (reasoning, answer); no think block -> (None, text).

    A '<think>' that is never closed (a truncated generation) is all reasoning and no answer.
    A template that pre-fills '<think>' leaves only the closing tag in the output; that works too.
    """
    if "</think>" in text:
        reasoning, answer = text.split("</think>", 1)
        return reasoning.replace("<think>", "", 1).strip() or None, answer.strip()
    if text.lstrip().startswith("<think>"):
        return text.lstrip()[len("<think>"):].strip() or None, ""
    match = re.search(r"^#+\s*Final Response\s*$", text, flags=re.M | re.I)
    if match:
        reasoning = re.sub(r"^#+\s*Thinking\s*$", "", text[: match.start()], flags=re.M | re.I)
        return reasoning.strip() or None, text[match.end():].strip()
    return None, text.strip()


def final_part(text: str) -> str:
    """The part of a model output that states the answer (never the reasoning)."""
    return split_think(text)[1]

# An option letter: "(c)" or "C" anywhere, a bare lower-case "c" only before punctuation or the end,
# so that "the answer is a deficiency" does not read as option A.
_LETTER = r"(?:\(([A-Ja-j])\)|([A-J])\b|([a-j])(?=[.):]|\s*$))"
# Explicit statements, strongest first.
_STATEMENTS = [
    rf"(?i:answer\s*(?:is|would be|:)\s*(?:option\s*)?){_LETTER}",
    rf"(?i:(?:correct|right|best)\s+(?:option|choice)\s+is\s*){_LETTER}",
    rf"(?i:(?:therefore|thus|so),?\s+(?:the\s+)?(?:option\s+)?){_LETTER}(?i:\s+is\s+(?:the\s+)?(?:correct|right|best))",
]


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """Return the option letter a text commits to, or None when it commits to none or to several.

    Order: an explicit statement ("the answer is (C)", "Answer: c") in the final part, the last
    one winning; then a lone letter; then the unique option whose text appears in the final part.
    """
    final = final_part(text)
    letters = set(options)
    for pattern in _STATEMENTS:
        found = ["".join(groups).upper() for groups in re.findall(pattern, final)]
        found = [letter for letter in found if letter in letters]
        if found:
            return found[-1]
    lone = re.fullmatch(r"\s*\(?([A-Ja-j])\)?[.:]?\s*", final)
    if lone and lone.group(1).upper() in letters:
        return lone.group(1).upper()
    said = _normal(final)
    matches = [k for k, v in options.items() if _normal(v) and f" {_normal(v)} " in f" {said} "]
    return matches[0] if len(matches) == 1 else None
