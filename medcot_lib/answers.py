"""Reading a final answer out of free text.

Used to recover answer letters from sources that have none (ReasonMed), by the evaluation stage
(MCQ letters, PubMedQA yes/no/maybe) and by distillation (keep a teacher's reasoning only when its
answer matches gold). Two rules keep the numbers honest:

- The reasoning part is never searched: only the final part counts.
- Nothing is dropped. An output that is empty, cut off, unreadable or that commits to several answers
  gives None, and None is counted wrong. Among explicit answer statements the last one wins: we never
  pick whichever of first or last happens to be right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DECISIONS = ("yes", "no", "maybe")
STATUSES = ("ok", "empty", "truncated", "unparsed", "ambiguous")

_OPEN, _CLOSE = "<think>", "</think>"
# HuatuoGPT-o1 writes "## Thinking\n...\n\n## Final Response\n...".
_THINKING_HEADING = re.compile(r"^#+\s*Thinking\s*:?\s*$", re.M | re.I)
_FINAL_HEADING = re.compile(r"^#+\s*Final Response\s*:?\s*$", re.M | re.I)
# End-of-turn tokens a decoder can leave as text (skip_special_tokens off, or a template whose end token is
# not registered as special). Whatever follows one is a hallucinated next turn, not this answer.
_END_OF_TURN = re.compile(r"<\|(?:im_end|endoftext|eot_id|end)\|>|<｜end▁of▁sentence｜>|</s>|<eos>|<end_of_turn>")


@dataclass(frozen=True)
class Extraction:
    """What extract() read from one output; answer is None unless status is "ok"."""

    reasoning: str | None
    final: str
    answer: str | None
    status: str  # one of STATUSES


# --- Splitting reasoning from the final part ---------------------------------------------------------


def _cut_at_end_of_turn(text: str) -> str:
    match = _END_OF_TURN.search(text)
    return text[: match.start()] if match else text


def _split(text: str) -> tuple[str | None, str, bool]:
    """(reasoning, final part, truncated) of an output whose end-of-turn leftovers are already cut."""
    opened, closed = text.rfind(_OPEN), text.rfind(_CLOSE)
    if opened > closed:  # the last think block never closes: max_new_tokens cut the reasoning short
        return text.replace(_OPEN, "").replace(_CLOSE, "").strip() or None, "", True
    if closed >= 0:  # the last '</think>', so a second think block is never searched as an answer
        reasoning = text[:closed].replace(_OPEN, "").replace(_CLOSE, "")
        return reasoning.strip() or None, text[closed + len(_CLOSE):].strip(), False
    finals = list(_FINAL_HEADING.finditer(text))
    if finals:
        reasoning = _THINKING_HEADING.sub("", text[: finals[-1].start()])
        return reasoning.strip() or None, text[finals[-1].end():].strip(), False
    if _THINKING_HEADING.match(text.lstrip()):  # "## Thinking" that never reached "## Final Response"
        return _THINKING_HEADING.sub("", text).strip() or None, "", True
    return None, text.strip(), False  # no structure (a base model rambling): all of it is the final part


def split_think(text: str) -> tuple[str | None, str]:
    """Split '<think>reasoning</think> answer' into (reasoning, answer); no think block -> (None, text).

    A '<think>' that is never closed (a truncated generation) is all reasoning and no answer.
    A template that pre-fills '<think>' leaves only the closing tag in the output; that works too, and
    so does HuatuoGPT's '## Thinking' / '## Final Response'.
    """
    reasoning, final, _ = _split(_cut_at_end_of_turn(text))
    return reasoning, final


def final_part(text: str) -> str:
    """The part of a model output that states the answer (never the reasoning)."""
    return split_think(text)[1]


def well_formed(text: str, *, prefilled_think: bool = False) -> bool:
    """Format compliance: a non-empty, closed reasoning block followed by a non-empty final part.

    Think tags: exactly one '</think>', and exactly one '<think>' opening the output; with
    prefilled_think the prompt already holds '<think>', so the output must hold none (a repeated tag is
    a format error). HuatuoGPT: '## Thinking' opening the output and one '## Final Response'.
    """
    text = _cut_at_end_of_turn(text).strip()
    if _CLOSE in text:
        opens = 0 if prefilled_think else 1
        tags_ok = (text.count(_CLOSE) == 1 and text.count(_OPEN) == opens
                   and (prefilled_think or text.startswith(_OPEN)))
    else:
        tags_ok = bool(_THINKING_HEADING.match(text)) and len(_FINAL_HEADING.findall(text)) == 1
    reasoning, final, truncated = _split(text)
    return tags_ok and bool(reasoning) and bool(final) and not truncated


# --- Shared pieces of answer statements ----------------------------------------------------------------

# What may follow a bare answer token ("C", "yes") so that it reads as an answer and not as a word:
# punctuation (but not "e.g." or "E.coli"), the end of a line, a dash, another answer ("A or C",
# "yes/no") or a connective ("C because ...").
_ENDS_ANSWER = (r"[.):,;!?}\]](?![A-Za-z0-9])|[ \t]*$|\s+[-–—]|\s*/|\s+(?:or|and|nor)\b"
                r"|\s+(?:because|since|as|given|due|is|was|seems|appears|would|which|for|in|here)\b")
# A capital letter may also be followed by a capitalised word or a bracket ("C Vitamin B12 deficiency");
# a lower-case one may not, so "the answer is a Type II reaction" is not option A.
_LETTER = re.compile(rf"\(([A-Ja-j])\)|\[([A-Ja-j])\]|([A-J])(?={_ENDS_ANSWER}|\s+[A-Z0-9(])|([a-j])(?={_ENDS_ANSWER})",
                     re.M)
_DECISION = re.compile(rf"(?i:(yes|no|maybe))(?={_ENDS_ANSWER}|\s+[A-Z])", re.M)
# Several answers in one statement: "A or C", "(A), (B) and (D)", "yes/no".
_JOIN = re.compile(r"\s*(?:,?\s*(?:or|and|&)\b|,|/)\s*", re.I)

# Phrases after which the answer itself comes: "The answer is", "Answer:", "Final answer", "The correct
# option is", "The most likely diagnosis is", "I would choose", "\boxed{". An adverb and "option" may follow.
_STATEMENT = re.compile(r"""
    (?: \b(?:final\s+)?answer(?:\s+to\s+(?:this|the)\s+question)?\s*
            (?:is|would\s+be|will\s+be|should\s+be|must\s+be|[:=\-–—])
      | \bfinal\s+answer\b                                  # a heading: "Final answer\nC"
      | \b(?:correct|right|best)\s+(?:option|choice)\s*(?:is|would\s+be|:)
      | \b(?:final\s+)?decision\s*(?:is|:)
      | \b(?:most\s+likely|correct|final)\s+(?:diagnosis|cause|explanation)\s*(?:is|would\s+be|:)
      | \bI(?:\s+would|\s+will|[’']d)?\s+(?:choose|select|pick|go\s+with)
      | \\boxed\{(?:\\text\{)?
    )
    \s*:?\s*
    (?:(?:therefore|thus|most\s+likely|likely|probably|clearly|definitely)\s*,?\s+)?
    (?:(?:option|choice)\s*)?
""", re.I | re.X)
# "Option D is correct", "(D) is the correct answer", "So, D is the best answer". A bare letter counts
# only at the start of a sentence, so that "Hepatitis B is the most likely diagnosis" is not option B.
_LETTER_IS_CORRECT = re.compile(r"""
    (?: (?i:\b(?:option|choice)\s+)([A-Ja-j])
      | \(([A-Ja-j])\)
      | (?:^|(?<=[.!?:;,]))\s*(?i:(?:so|thus|hence|therefore),?\s+)?([A-J])
    )
    (?i:\s+(?:is|would\s+be)\s+(?:the\s+)?(?:correct|right|best|most\s+likely|most\s+appropriate|answer)\b)
""", re.M | re.X)
# A line that is only labels: "C.", "(B)", "A or C".
_LABELS_LINE = re.compile(r"\s*[-•]?\s*\(?[A-Ja-j]\)?[.):]?(?:(?:\s*,?\s*(?:or|and|&)\s+|\s*[,/]\s*)\(?[A-Ja-j]\)?[.):]?)*\s*",
                          re.I)
# A line led by a label: "C. Vitamin B12 deficiency", "(B) Folate deficiency", "C - ...".
_LABEL_LED_LINE = re.compile(r"\s*[-•]?\s*(?:\(([A-Ja-j])\)|([A-Ja-j])[.)]|([A-J])(?::|\s+[-–—]))(?=\s+\S)")
# A yes/no/maybe that stands as an answer: followed by punctuation or the end of a line ("Yes, ...", "NO.").
_STANDALONE_DECISION = re.compile(r"(?<![\w-])(yes|no|maybe)(?=\s*(?:[.,;:!?)]|$))", re.I | re.M)


def _plain(final: str) -> str:
    """Markdown emphasis, code marks and heading marks removed: '**Answer:** C' -> 'Answer: C'."""
    return re.sub(r"^\s*#+\s*", "", re.sub(r"\*\*|__|[*`]", "", final), flags=re.M)


def _letter(match: re.Match) -> str:
    return "".join(group for group in match.groups() if group).upper()


def _values(text: str, pos: int, value_at) -> set[str]:
    """Every answer one statement names from pos on: 'A or C' -> {'A', 'C'}."""
    found = set()
    while (hit := value_at(text, pos)) is not None:
        value, pos = hit
        found.add(value)
        join = _JOIN.match(text, pos)
        if not join:
            break
        pos = join.end()
    return found


def _statements(text: str, value_at) -> list[tuple[int, set[str]]]:
    """(position, answers named) of each explicit statement ('The answer is ...') in text."""
    return [(m.start(), _values(text, m.end(), value_at)) for m in _STATEMENT.finditer(text)]


def _last(statements: list[tuple[int, set[str]]]) -> set[str] | None:
    """The answers of the last statement that names any: a model that corrects itself ('The answer is
    B. Wait, no: the answer is D') means the correction. None when no statement names an answer."""
    statements = [(pos, found) for pos, found in statements if found]
    return max(statements, key=lambda s: s[0])[1] if statements else None


def _settle(found: set[str], allowed) -> tuple[str | None, str]:
    """One allowed answer -> ok; several -> ambiguous; none, or one that is not an option -> unparsed."""
    if len(found) > 1:
        return None, "ambiguous"
    answer = next(iter(found), None)
    return (answer, "ok") if answer in allowed else (None, "unparsed")


# --- Multiple choice -----------------------------------------------------------------------------------


def _option_patterns(options: dict[str, str]) -> list[tuple[str, re.Pattern]]:
    """A pattern per option text, ignoring case and punctuation; longest text first, so that 'Iron
    deficiency anemia' is tried before 'Iron deficiency'."""
    patterns = []
    for letter, text in sorted(options.items(), key=lambda item: -len(item[1])):
        words = re.findall(r"\w+", text.lower())
        if words:
            patterns.append((letter, re.compile(r"(?<!\w)" + r"[\W_]+".join(map(re.escape, words)) + r"(?!\w)", re.I)))
    return patterns


def _choice_at(text: str, pos: int, patterns) -> tuple[str, int] | None:
    """The option named at pos: its text first ('E. coli' is a text, not option E), else a letter."""
    for letter, pattern in patterns:
        if match := pattern.match(text, pos):
            return letter, match.end()
    if match := _LETTER.match(text, pos):
        return _letter(match), match.end()
    return None


def _line_choices(line: str, patterns) -> set[str]:
    """Options one line of the final part gives as its whole content: labels only ('C.', '(B)', 'A or
    C'), a label and text ('C. Vitamin B12 deficiency'), or an option's text alone. A sentence that
    merely mentions an option ('It is not folate deficiency') gives none."""
    if not line.strip():
        return set()
    if _LABELS_LINE.fullmatch(line):
        return {letter.upper() for letter in re.findall(r"(?<![A-Za-z])([A-Ja-j])(?![A-Za-z])", line)}
    found, rest = set(), line
    if match := _LABEL_LED_LINE.match(line):
        found, rest = {_letter(match)}, line[match.end():]
    rest = rest.strip().rstrip(".!;:,")
    return found | {letter for letter, pattern in patterns if pattern.fullmatch(rest)}


def _choices(final: str, options: dict[str, str]) -> set[str]:
    """Letters the final part commits to: the last explicit statement; failing that, the options its
    lines give as their whole content (one is an answer, several, as in a repeated options list, are
    ambiguous)."""
    text, patterns = _plain(final), _option_patterns(options)
    statements = _statements(text, lambda t, pos: _choice_at(t, pos, patterns))
    statements += [(m.start(), {_letter(m)}) for m in _LETTER_IS_CORRECT.finditer(text)]
    stated = _last(statements)
    if stated is not None:
        return stated
    # Letters outside the options are kept: "A or E" is a hedge and "E" alone is not an answer.
    return set().union(*(_line_choices(line, patterns) for line in text.splitlines()))


# --- Yes / no / maybe ----------------------------------------------------------------------------------


def _decision_at(text: str, pos: int) -> tuple[str, int] | None:
    match = _DECISION.match(text, pos)
    return (match.group(1).lower(), match.end()) if match else None


def _decisions(final: str) -> set[str]:
    """Decisions the final part commits to: the last explicit statement ('The answer is yes'); failing
    that, every yes/no/maybe that stands as an answer ('Yes, ...', 'NO.', a lone 'maybe'). A word
    followed by more words ('no evidence', 'maybe because') is incidental and does not count."""
    text = _plain(final)
    stated = _last(_statements(text, _decision_at))
    if stated is not None:
        return stated
    return {match.group(1).lower() for match in _STANDALONE_DECISION.finditer(text)}


# --- Public API ----------------------------------------------------------------------------------------


def extract(text: str, *, options: dict[str, str] | None = None, decision: bool = False) -> Extraction:
    """Read the answer of one output: an option letter (pass options), yes/no/maybe (decision=True), or,
    for an open question (neither), the final part itself.

    status: "empty" (blank output), "truncated" (reasoning never closed), "unparsed" (no answer, or a
    letter that is not an option), "ambiguous" (several answers committed to), "ok".
    """
    if options is not None and decision:
        raise ValueError("extract() takes options (multiple choice) or decision=True (yes/no/maybe), not both")
    text = _cut_at_end_of_turn(text)
    if not text.strip():
        return Extraction(None, "", None, "empty")
    reasoning, final, truncated = _split(text)
    if truncated:
        return Extraction(reasoning, final, None, "truncated")
    if decision:
        answer, status = _settle(_decisions(final), DECISIONS)
    elif options is not None:
        answer, status = _settle(_choices(final, options), options)
    else:
        answer, status = final or None, "ok" if final else "unparsed"
    return Extraction(reasoning, final, answer, status)


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """Return the option letter a text commits to, or None when it commits to none or to several.

    Order: the last explicit statement in the final part ("the answer is (C)", "Answer: c", "Option C
    is correct"), naming a letter or an option's text; failing that, the lines that are only a label
    ("C.", "(B)"), a label and its text, or an option's text, when they give exactly one option. A
    sentence that merely mentions an option's text is not an answer.
    """
    return extract(text, options=options).answer


def extract_decision(text: str) -> str | None:
    """Return "yes", "no" or "maybe" for a PubMedQA answer, or None when it commits to none or several.

    A leading "Yes, ..." is a committed answer: that is how people (and PubMedQA's long answers) answer
    a yes/no question. An explicit statement overrides it: "Yes, ... but the answer is no" -> "no".
    """
    return extract(text, decision=True).answer
