"""The reasoning block apart from the answer, in an output that is still streaming or finished."""

from __future__ import annotations

from dataclasses import dataclass

from ..prompts import THINK_CLOSE, THINK_OPEN

# States of a think block in an output: none, still streaming, closed, or ended without '</think>'.
NO_BLOCK, OPEN, CLOSED, UNCLOSED = "none", "open", "closed", "unclosed"
TITLES = {OPEN: "Reasoning…", CLOSED: "Reasoning", UNCLOSED: "Reasoning (unclosed: the output ended before </think>)"}


@dataclass(frozen=True)
class Parts:
    reasoning: str | None  # None: no think block (yet)
    answer: str
    state: str  # NO_BLOCK | OPEN | CLOSED | UNCLOSED


def _arriving(text: str, tag: str) -> int:
    """Length of the longest proper prefix of tag that text ends with: a tag still arriving token by token."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


def split_reasoning(text: str, *, prefilled: bool = False, finished: bool = False) -> Parts:
    """Reasoning and final answer of an output, while it streams and once it is finished.

    A think block counts when it opens the output (or the prompt pre-filled '<think>', as native templates do). A tag
    still arriving ('<thi', '</th') is held back rather than shown. An output that ends inside its think block is
    unclosed: all reasoning, no answer.
    """
    head = text.lstrip()
    if prefilled:
        body = text
    elif head.startswith(THINK_OPEN):
        body = head[len(THINK_OPEN):]
    elif not finished and THINK_OPEN.startswith(head):  # nothing yet, or '<thi' arriving
        return Parts(None, "", NO_BLOCK)
    else:
        return Parts(None, text.strip(), NO_BLOCK)
    if THINK_CLOSE in body:
        reasoning, answer = body.split(THINK_CLOSE, 1)
        return Parts(reasoning.strip(), answer.strip(), CLOSED)
    if finished:
        return Parts(body.strip(), "", UNCLOSED)
    return Parts(body[: len(body) - _arriving(body, THINK_CLOSE)].strip(), "", OPEN)


def turn_messages(question: str, text: str, *, prefilled: bool, finished: bool) -> list[dict]:
    """One question and one model's output as chat messages; the reasoning is a collapsible 'thought' message."""
    parts = split_reasoning(text, prefilled=prefilled, finished=finished)
    messages = [{"role": "user", "content": question}]
    if parts.reasoning is not None:
        status = "pending" if parts.state == OPEN else "done"
        messages.append({"role": "assistant", "content": parts.reasoning or "…",
                         "metadata": {"title": TITLES[parts.state], "status": status}})
    if parts.answer:
        messages.append({"role": "assistant", "content": parts.answer})
    elif finished:
        messages.append({"role": "assistant", "content": "*No final answer: the output ended inside its reasoning.*"
                         if parts.state == UNCLOSED else "*(empty output)*"})
    return messages

