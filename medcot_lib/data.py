"""Loading, normalising and preparing data: the dataset-inspection stage (00).

Every supported schema becomes one `Record`. Real files load unchanged, quirks included:
MedQA with 4 or 5 options, options with newlines, questions ending in a stray quote,
PubMedQA keyed by PMID with its separate test ground truth, MedMCQA's 1-based `cop`, and
ReasonMed answers that exist only inside the output text.

Preparation (`prepare`) filters, deduplicates, decontaminates, samples the mixture and
splits, and every step reports what it dropped and why.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .answers import extract_choice, split_think
from .errors import MedcotError, input_error
from .fileio import read_json, read_utf8, write_json, write_jsonl
from .recipe import (
    BUNDLED_PREFIX,
    DISTILLED,
    DatasetSource,
    Recipe,
    bundled_path,
    is_dataset_dir,
    is_local_file,
)

YES_NO_MAYBE = ("yes", "no", "maybe")


@dataclass(frozen=True)
class Record:
    """One item, whatever its source schema."""

    id: str
    source: str
    question: str
    answer: str  # Response, option text, or PubMedQA's long answer
    reasoning: str | None = None  # chain of thought, when the source has one
    context: str | None = None  # e.g. PubMedQA abstract sections
    options: dict[str, str] | None = None  # letter -> option text
    gold: str | None = None  # option letter, or yes/no/maybe

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        return cls(**row)


@dataclass
class LoadReport:
    source: str
    path: str
    format: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    repaired: Counter = field(default_factory=Counter)  # quirk -> count

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": dict(self.skipped), "repaired": dict(self.repaired)}


class Skip(Exception):
    """Raised by a normaliser for an item that cannot be used; the reason is reported, not hidden."""


# --------------------------------------------------------------------------- reading files


def _line_at(text: str) -> Callable[[int], int]:
    """Return pos -> 1-based line number, counting incrementally (positions only grow)."""
    state = {"pos": 0, "line": 1}

    def line_of(pos: int) -> int:
        state["line"] += text.count("\n", state["pos"], pos)
        state["pos"] = pos
        return state["line"]

    return line_of


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_error(path: Path, exc: json.JSONDecodeError, line: int | None = None) -> MedcotError:
    """Name the file and line; JSON Lines pass the file's line, since each line is parsed alone."""
    return input_error(f"not valid JSON: {exc.msg} at column {exc.colno}", file=path, line=line or exc.lineno)


def _iter_container(text: str, path: Path) -> Iterator[tuple[int, str | None, Any]]:
    """Yield (line, key, value) for each element of a top-level JSON array or object."""
    decoder = json.JSONDecoder()
    line_of = _line_at(text)
    pos = _skip_ws(text, 0)
    closer = "]" if text[pos] == "[" else "}"
    pos = _skip_ws(text, pos + 1)
    try:
        while text[pos] != closer:
            key = None
            if closer == "}":
                key, pos = decoder.raw_decode(text, pos)
                pos = _skip_ws(text, pos)
                if text[pos] != ":":
                    raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
                pos = _skip_ws(text, pos + 1)
            start = pos
            value, pos = decoder.raw_decode(text, pos)
            yield line_of(start), key, value
            pos = _skip_ws(text, pos)
            if text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
            elif text[pos] != closer:
                raise json.JSONDecodeError(f"Expecting ',' or '{closer}'", text, pos)
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc) from None
    except IndexError:
        raise input_error("not valid JSON: the file ends before its closing bracket", file=path, line=line_of(len(text))) from None
    rest = _skip_ws(text, pos + 1)
    if rest < len(text):
        raise input_error("not valid JSON: extra data after the top-level value", file=path, line=line_of(rest))


def _iter_jsonl(text: str, path: Path) -> Iterator[tuple[int, str | None, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, None, json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc, line=number) from None


def _is_jsonl(text: str, start: int) -> bool:
    """A '{' file is JSONL when its first line is a whole JSON value and more follows it.

    Only the first line is parsed, so a large object keyed by id is not read twice.
    """
    end = text.find("\n", start)
    if end == -1:
        return False
    try:
        json.loads(text[start:end])
    except json.JSONDecodeError:
        return False
    return _skip_ws(text, end) < len(text)


def read_items(path: str | Path) -> Iterator[tuple[int, str | None, Any]]:
    """Yield (line, key, item) from a .json array, a .json object keyed by id, or JSON Lines."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise input_error("file not found", file=path)
    text = read_utf8(path)
    start = _skip_ws(text, 0)
    if start == len(text):
        raise input_error("file is empty", file=path, expected="a JSON array, a JSON object keyed by id, or JSON Lines")
    if path.suffix == ".jsonl" or (text[start] == "{" and _is_jsonl(text, start)):
        yield from _iter_jsonl(text, path)
    elif text[start] in "[{":
        yield from _iter_container(text, path)
    else:
        raise input_error(f"not valid JSON: starts with {text[start]!r}", file=path, line=text.count("\n", 0, start) + 1)


# --------------------------------------------------------------------------- schemas


def detect_format(item: Any, keyed: bool) -> str:
    """Name the schema of one raw item (keyed: it came from an object keyed by id)."""
    if isinstance(item, dict):
        keys = set(item)
        if (keyed and {"QUESTION", "CONTEXTS"} <= keys) or {"pubid", "question", "context", "final_decision"} <= keys:
            return "pubmedqa"  # ori_pqal.json keyed by PMID, or the hub copy's rows
        if {"Question", "Complex_CoT", "Response"} <= keys:
            return "medical_o1"
        if {"opa", "opb", "opc", "opd"} <= keys:
            return "medmcqa"
        if {"question", "options"} <= keys and ("answer_idx" in keys or "answer" in keys):
            return "mcq"
        if {"instruction", "output"} <= keys:
            return "reasonmed"
        if "messages" in keys:
            return "messages"
        if "conversations" in keys:
            return "sharegpt"
    shown = sorted(item)[:12] if isinstance(item, dict) else type(item).__name__
    raise MedcotError(
        f"cannot tell the schema of an item with keys {shown} (expected medical-o1 Question/Complex_CoT/Response, "
        "MedQA question/options/answer_idx, PubMedQA QUESTION/CONTEXTS keyed by PMID, MedMCQA opa..opd/cop, "
        "alpaca instruction/input/output, messages, or conversations); set `format:` explicitly"
    )


@dataclass
class _Where:
    file: str
    line: int  # the file's line, or the row number of a dataset read through `load_dataset`
    report: LoadReport
    rows: bool = False

    def error(self, message: str, field: str | None = None, expected: str | None = None) -> MedcotError:
        if self.rows:
            return input_error(message, file=self.file, row=self.line, field=field, expected=expected)
        return input_error(message, file=self.file, line=self.line, field=field, expected=expected)

    def text(self, item: dict, name: str, expected: str = "a non-empty string") -> str:
        if name not in item:
            raise self.error("missing field", field=name, expected=expected)
        value = item[name]
        if not isinstance(value, str):
            raise self.error(f"wrong type {type(value).__name__}", field=name, expected=expected)
        return value.strip()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clean_question(question: str, where: _Where) -> str:
    # 69 MedQA test questions end with a stray, unmatched '"'.
    if question.endswith('"') and question.count('"') % 2 == 1:
        where.report.repaired["stray trailing quote removed"] += 1
        question = question[:-1].rstrip()
    return question


def _clean_options(options: Any, where: _Where, field_name: str = "options") -> dict[str, str]:
    if not isinstance(options, dict) or not options:
        raise where.error("options must be a non-empty object", field=field_name, expected='{"A": "...", "B": "...", ...}')
    cleaned = {}
    for letter, text in options.items():
        if not (isinstance(letter, str) and re.fullmatch(r"[A-J]", letter)) or not isinstance(text, str):
            raise where.error(f"bad option {letter!r}: {text!r}", field=field_name, expected="letters A..J mapping to strings")
        if "\n" in text:
            where.report.repaired["newline inside option joined"] += 1
        cleaned[letter] = _one_line(text)
    return dict(sorted(cleaned.items()))


def _medical_o1_choices(item: dict, where: _Where) -> tuple[dict[str, str] | None, str | None]:
    """(options, gold letter) of a medical-o1 item that also carries MedQA-style `options` and `answer_idx`.

    Such items are rendered with the multiple-choice prompt that eval sets use, so training sees the
    eval prompt's shape. Copies in the wild carry these fields in other shapes too; those items stay
    open-ended and the load report counts them.
    """
    options, letter = item.get("options"), item.get("answer_idx")
    if options is None and letter is None:
        return None, None
    usable = (isinstance(options, dict) and options and isinstance(letter, str) and letter in options
              and all(isinstance(k, str) and re.fullmatch(r"[A-J]", k) and isinstance(v, str) and v.strip()
                      for k, v in options.items()))
    if not usable:
        where.report.repaired["options/answer_idx not a letter-keyed object and its letter: read as open-ended"] += 1
        return None, None
    return _clean_options(options, where), letter


def _norm_medical_o1(item: dict, where: _Where, n: int) -> Record:
    options, gold = _medical_o1_choices(item, where)
    return Record(
        id=f"{where.report.source}-{n:06d}",
        source=where.report.source,
        question=where.text(item, "Question"),
        reasoning=where.text(item, "Complex_CoT"),
        answer=where.text(item, "Response"),
        options=options,
        gold=gold,
    )


def _norm_mcq(item: dict, where: _Where, n: int) -> Record:
    options = _clean_options(item.get("options"), where)
    letter = item.get("answer_idx")
    answer = item.get("answer")
    if letter is None and isinstance(answer, str):
        letters = [k for k, v in options.items() if v == _one_line(answer)]
        letter = letters[0] if len(letters) == 1 else None
    if letter not in options:
        raise where.error(f"answer_idx {letter!r} is not one of the options {list(options)}", field="answer_idx", expected="an option letter")
    if isinstance(answer, str) and _one_line(answer) != options[letter]:
        raise where.error(f"answer {answer!r} differs from options[{letter}] {options[letter]!r}", field="answer", expected="the text of the answer_idx option")
    return Record(
        id=str(item.get("realidx") or f"{where.report.source}-{n:06d}"),
        source=where.report.source,
        question=_clean_question(where.text(item, "question"), where),
        options=options,
        gold=letter,
        answer=options[letter],
    )


def _norm_medmcqa(item: dict, where: _Where, n: int) -> Record:
    options = _clean_options({k: item.get(f"op{k.lower()}") for k in "ABCD"}, where, field_name="opa..opd")
    cop = item.get("cop")
    if cop is None:
        raise Skip("no answer key (cop absent, as in MedMCQA's test split)")
    if not isinstance(cop, int) or isinstance(cop, bool) or not 1 <= cop <= 4:
        raise where.error(f"cop is {cop!r}", field="cop", expected="an integer 1..4, 1-based (1 = opa)")
    letter = "ABCD"[cop - 1]
    explanation = item.get("exp")
    return Record(
        id=str(item.get("id") or f"{where.report.source}-{n:06d}"),
        source=where.report.source,
        question=_clean_question(where.text(item, "question"), where),
        options=options,
        gold=letter,
        answer=options[letter],
        reasoning=explanation.strip() if isinstance(explanation, str) and explanation.strip() else None,
    )


_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.):]\s+(.+?)\s*$")


def _split_instruction(instruction: str) -> tuple[str, dict[str, str]]:
    question_lines, options = [], {}
    for line in instruction.splitlines():
        match = _OPTION_LINE.match(line)
        if match:
            options[match.group(1)] = match.group(2)
        elif not options:
            question_lines.append(line)
    question = "\n".join(question_lines).strip()
    question = re.sub(r"^Please answer the following multiple-choice question:\s*", "", question)
    return question, options


def _norm_reasonmed(item: dict, where: _Where, n: int) -> Record:
    instruction = where.text(item, "instruction")
    extra = item.get("input") or ""
    question, options = _split_instruction(instruction + ("\n" + extra if extra else ""))
    output = where.text(item, "output")
    if not options:
        return Record(id=f"{where.report.source}-{n:06d}", source=where.report.source, question=question, answer=output)
    letter = extract_choice(output, options)
    if letter is None:
        raise Skip("no answer letter could be read from the output")
    return Record(
        id=f"{where.report.source}-{n:06d}",
        source=where.report.source,
        question=question,
        options=options,
        gold=letter,
        answer=options[letter],
        reasoning=output,
    )


def _norm_turns(turns: Any, where: _Where, n: int, *, field_name: str, role_key: str, text_key: str, roles: tuple[str, str]) -> Record:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise where.error("must be a list of turn objects", field=field_name, expected=f'[{{"{role_key}": ..., "{text_key}": ...}}, ...]')
    user_role, assistant_role = roles
    users = [t.get(text_key) for t in turns if t.get(role_key) == user_role]
    replies = [t.get(text_key) for t in turns if t.get(role_key) == assistant_role]
    if not users or not replies:
        raise where.error(f"needs a '{user_role}' turn and a '{assistant_role}' turn", field=field_name)
    if len(users) > 1:
        where.report.repaired["multi-turn: first question and last reply used"] += 1
    reasoning, answer = split_think(str(replies[-1]))
    return Record(id=f"{where.report.source}-{n:06d}", source=where.report.source, question=str(users[0]).strip(), reasoning=reasoning, answer=answer)


def _norm_messages(item: dict, where: _Where, n: int) -> Record:
    return _norm_turns(item.get("messages"), where, n, field_name="messages", role_key="role", text_key="content", roles=("user", "assistant"))


def _norm_sharegpt(item: dict, where: _Where, n: int) -> Record:
    return _norm_turns(item.get("conversations"), where, n, field_name="conversations", role_key="from", text_key="value", roles=("human", "gpt"))


def _pubmedqa_hub_row(item: dict, where: _Where) -> tuple[dict, str]:
    """The hub copy (qiaojin/PubMedQA) nests contexts and labels under `context`; map it to ori_pqal's names."""
    context = item.get("context")
    if not isinstance(context, dict):
        raise where.error("must be an object with contexts and labels", field="context")
    mapped = {"QUESTION": item.get("question"), "CONTEXTS": context.get("contexts"), "LABELS": context.get("labels"),
              "final_decision": item.get("final_decision"), "LONG_ANSWER": item.get("long_answer")}
    return mapped, str(item.get("pubid"))


def _norm_pubmedqa(item: dict, where: _Where, n: int, pmid: str | None) -> Record:
    if "QUESTION" not in item and "pubid" in item:
        item, pmid = _pubmedqa_hub_row(item, where)
    contexts = item.get("CONTEXTS")
    labels = item.get("LABELS") or [None] * len(contexts or [])
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        raise where.error("must be a non-empty list of strings", field="CONTEXTS")
    decision = item.get("final_decision")
    if decision not in YES_NO_MAYBE:
        raise where.error(f"final_decision is {decision!r}", field="final_decision", expected="yes, no or maybe")
    sections = [f"{label}: {text.strip()}" if label else text.strip() for label, text in zip(labels, contexts, strict=False)]
    return Record(
        id=str(pmid if pmid is not None else f"{where.report.source}-{n:06d}"),
        source=where.report.source,
        question=where.text(item, "QUESTION"),
        context="\n".join(sections),
        gold=decision,
        answer=str(item.get("LONG_ANSWER") or decision).strip(),
    )


_NORMALISERS = {
    "medical_o1": _norm_medical_o1,
    "mcq": _norm_mcq,
    "medmcqa": _norm_medmcqa,
    "reasonmed": _norm_reasonmed,
    "messages": _norm_messages,
    "sharegpt": _norm_sharegpt,
}


# --------------------------------------------------------------------------- sources


def reference_file(reference: str) -> Path | None:
    """The local file behind a data reference (bundled:NAME or a path); None for a hub id or a hub-layout directory."""
    if reference.startswith(BUNDLED_PREFIX):
        return bundled_path(reference)
    if is_local_file(reference) and not is_dataset_dir(reference):
        return Path(reference).expanduser()
    return None


def _hub_rows(source: DatasetSource) -> Iterator[tuple[int, str | None, Any]]:
    from datasets import load_dataset

    from .models import hub_token

    try:
        rows = load_dataset(source.path, source.config, split=source.split, token=hub_token())
    except Exception as exc:  # datasets raises several types for offline/missing; all mean "cannot load"
        if is_dataset_dir(source.path):
            raise MedcotError(f"{source.path}: the dataset directory (config {source.config!r}, split {source.split!r}) could "
                              f"not be loaded: {type(exc).__name__}: {exc}") from None
        raise MedcotError(
            f"dataset '{source.path}' (config {source.config!r}, split {source.split!r}) could not be loaded from the "
            f"Hugging Face Hub: {type(exc).__name__}: {exc}. If you are offline, download the file on a connected "
            f"machine and set `path:` to the local .json/.jsonl file; the loaders read the hub files unchanged"
        ) from None
    for index, row in enumerate(rows):
        yield index + 1, None, row


def _dataset_origin(source: DatasetSource) -> str:
    """How errors name a dataset read through `load_dataset`: the hub id or directory, with its config and split."""
    where = str(Path(source.path).expanduser()) if is_dataset_dir(source.path) else f"hub:{source.path}"
    return f"{where} (config {source.config or 'default'}, split {source.split})"


def _load_ground_truth(path: Path) -> dict[str, str]:
    """PubMedQA's {pmid: decision} file, read with the same line-aware reader as the data."""
    truth = {}
    for line, key, decision in read_items(path):
        if key is None or decision not in YES_NO_MAYBE:
            raise input_error(f"entry {decision!r}", file=path, line=line, expected="one JSON object {pmid: yes|no|maybe}")
        truth[str(key)] = decision
    return truth


def load_source(source: DatasetSource) -> tuple[list[Record], LoadReport]:
    """Load one source into Records, with a report of what was skipped or repaired."""
    path = reference_file(source.path)
    origin = str(path) if path else _dataset_origin(source)
    items = read_items(path) if path else _hub_rows(source)
    report = LoadReport(source=source.label, path=origin, format=source.format)
    truth = _load_ground_truth(reference_file(source.ground_truth)) if source.ground_truth else None
    records, seen = [], set()
    for n, (line, key, item) in enumerate(items):
        where = _Where(origin, line, report, rows=path is None)
        if report.format == "auto":
            report.format = detect_format(item, keyed=key is not None)
        if not isinstance(item, dict):
            raise where.error(f"item is a {type(item).__name__}", expected="a JSON object")
        report.read += 1
        if truth is not None and key not in truth:
            report.skipped["not in the ground-truth split"] += 1
            continue
        seen.add(key)
        try:
            if report.format == "pubmedqa":
                record = _norm_pubmedqa(item, where, n, key)
            else:
                record = _NORMALISERS[report.format](item, where, n)
        except Skip as skip:
            report.skipped[str(skip)] += 1
            continue
        if truth is not None and truth[key] != record.gold:
            raise where.error(f"final_decision {record.gold!r} disagrees with ground truth {truth[key]!r}", field="final_decision")
        records.append(record)
    if report.read == 0:
        raise input_error("contains no items", file=origin)
    if truth is not None and set(truth) - seen:
        missing = sorted(set(truth) - seen)
        raise input_error(f"{len(missing)} ground-truth ids are absent from the data file (e.g. {missing[:3]})", file=source.ground_truth)
    report.kept = len(records)
    return records, report


# --------------------------------------------------------------------------- filters


@dataclass
class StepReport:
    step: str
    source: str
    before: int
    dropped: int
    reasons: dict[str, int]
    examples: list[str]  # a few dropped ids, with what they collided with where relevant
    observed: str = ""  # what the step saw, e.g. the range of reasoning lengths, for when it drops everything

    @property
    def after(self) -> int:
        return self.before - self.dropped


def step_report(step: str, source: str, before: int, dropped: list[tuple[Record, str, str]], observed: str = "") -> StepReport:
    reasons = Counter(reason for _, reason, _ in dropped)
    examples = [f"{r.id}{' ~ ' + other if other else ''}" for r, _, other in dropped[:5]]
    return StepReport(step, source, before, len(dropped), dict(reasons), examples, observed)


def reasoning_lengths(records: list[Record]) -> str:
    """The range of reasoning lengths in characters, as a filter's error message shows it."""
    lengths = sorted(len(r.reasoning) for r in records if r.reasoning)
    without = len(records) - len(lengths)
    seen = (f"reasoning lengths {lengths[0]}-{lengths[-1]} chars (median {lengths[len(lengths) // 2]})"
            if lengths else "no item has reasoning")
    return seen + (f"; {without} of {len(records)} items have none" if lengths and without else "")


def quality_filter(records: list[Record], min_cot_chars: int) -> tuple[list[Record], StepReport]:
    kept, dropped = [], []
    for r in records:
        if not r.question.strip():
            dropped.append((r, "empty question", ""))
        elif not r.answer.strip():
            dropped.append((r, "empty answer", ""))
        elif min_cot_chars and not r.reasoning:
            dropped.append((r, f"no reasoning (min_cot_chars={min_cot_chars})", ""))
        elif min_cot_chars and len(r.reasoning) < min_cot_chars:
            dropped.append((r, f"reasoning shorter than {min_cot_chars} chars", ""))
        else:
            kept.append(r)
    return kept, step_report("quality", "all", len(records), dropped, reasoning_lengths(records))


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split())


def prompt_text(record: Record) -> str:
    """The normalised text a model is asked: context, question and options."""
    options = " ".join(f"{k} {v}" for k, v in (record.options or {}).items())
    return normalise_text(" ".join(filter(None, [record.context, record.question, options])))


def _shingles(text: str, width: int = 3) -> set[int]:
    words = re.findall(r"\w+", text)
    if len(words) < width:
        return {zlib.crc32(" ".join(words).encode())}
    return {zlib.crc32(" ".join(words[i : i + width]).encode()) for i in range(len(words) - width + 1)}


_MERSENNE = (1 << 31) - 1


def _minhash(shingles: set[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    values = np.fromiter(shingles, dtype=np.uint64, count=len(shingles)) % _MERSENNE
    return ((values[:, None] * a + b) % _MERSENNE).min(axis=0)


def deduplicate(records: list[Record], threshold: float, seed: int = 0) -> tuple[list[Record], StepReport]:
    """Drop exact duplicates of the prompt, then near-duplicates (word 3-gram Jaccard >= threshold).

    Candidates come from MinHash LSH (64 hashes in 16 bands of 4, so pairs near Jaccard 0.5
    and above collide with high probability); each candidate is then checked on the exact
    Jaccard, so the LSH only prunes work and never decides. The first occurrence is kept.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _MERSENNE, size=64, dtype=np.uint64)
    b = rng.integers(0, _MERSENNE, size=64, dtype=np.uint64)
    seen_exact: dict[str, str] = {}
    buckets: dict[tuple, list[int]] = defaultdict(list)
    kept, kept_shingles, dropped = [], [], []
    for r in records:
        text = prompt_text(r)
        if text in seen_exact:
            dropped.append((r, "exact duplicate", seen_exact[text]))
            continue
        shingles = _shingles(text)
        signature = _minhash(shingles, a, b)
        keys = [(band, tuple(signature[band * 4 : band * 4 + 4])) for band in range(16)]
        candidates = {j for key in keys for j in buckets.get(key, ())}
        match = next((j for j in sorted(candidates) if len(shingles & kept_shingles[j]) / len(shingles | kept_shingles[j]) >= threshold), None)
        if match is not None:
            dropped.append((r, f"near duplicate (Jaccard >= {threshold})", kept[match].id))
            continue
        seen_exact[text] = r.id
        for key in keys:
            buckets[key].append(len(kept))
        kept.append(r)
        kept_shingles.append(shingles)
    return kept, step_report("deduplicate", "all", len(records), dropped)


def decontaminate(records: list[Record], eval_records: list[Record], chars: int) -> tuple[list[Record], StepReport]:
    """Drop training items that share a substring of `chars` characters with any eval item.

    Eval texts are indexed by every (chars/2)-gram; each training text is probed at a stride
    of chars/2, which cannot miss a shared run of `chars` (it always contains one aligned probe),
    and each hit is confirmed by extending it both ways, so the test is exact.
    """
    if not chars or not eval_records:
        return records, step_report("decontaminate", "all", len(records), [])
    probe = chars // 2
    eval_texts = [prompt_text(e) for e in eval_records]
    index: dict[str, set[int]] = defaultdict(set)
    for i, text in enumerate(eval_texts):
        for p in range(len(text) - probe + 1):
            index[text[p : p + probe]].add(i)
    kept, dropped = [], []
    for r in records:
        text = normalise_text(" ".join(filter(None, [r.context, r.question, r.reasoning, r.answer])))
        hit = _shared_run(text, eval_texts, index, probe, chars)
        if hit is None:
            kept.append(r)
        else:
            dropped.append((r, f"shares {chars}+ chars with eval data", eval_records[hit].id))
    return kept, step_report("decontaminate", "all", len(records), dropped)


def _shared_run(text: str, eval_texts: list[str], index: dict[str, set[int]], probe: int, chars: int) -> int | None:
    for p in range(0, len(text) - probe + 1, probe):
        gram = text[p : p + probe]
        for i in sorted(index.get(gram, ())):
            other = eval_texts[i]
            q = other.find(gram)
            while q != -1:
                left = 0
                while p - left > 0 and q - left > 0 and text[p - left - 1] == other[q - left - 1]:
                    left += 1
                right = 0
                while p + probe + right < len(text) and q + probe + right < len(other) and text[p + probe + right] == other[q + probe + right]:
                    right += 1
                if left + probe + right >= chars:
                    return i
                q = other.find(gram, q + 1)
    return None


def sample_mixture(by_source: dict[str, list[Record]], sources: list[DatasetSource], seed: int) -> tuple[list[Record], list[StepReport]]:
    """Keep `weight` of each source (seeded sample, order preserved), then apply its cap."""
    mixed, reports = [], []
    for source in sources:
        pool = by_source.get(source.label, [])
        take = round(source.weight * len(pool))
        if source.max_samples is not None:
            take = min(take, source.max_samples)
        rng = random.Random(f"{seed}:{source.label}")
        chosen = sorted(rng.sample(range(len(pool)), take))
        keep = set(chosen)
        reason = f"not sampled (weight {source.weight}" + (f", cap {source.max_samples})" if source.max_samples else ")")
        dropped = [(r, reason, "") for i, r in enumerate(pool) if i not in keep]
        reports.append(step_report("mixture", source.label, len(pool), dropped))
        mixed.extend(pool[i] for i in chosen)
    return mixed, reports


def split_size(value: float, total: int) -> int:
    return int(value) if value >= 1 else round(value * total)


def split(records: list[Record], val_size: float, test_size: float, seed: int) -> dict[str, list[Record]]:
    """Seeded shuffle, then test and validation are cut off the front; the rest is train."""
    order = list(records)
    random.Random(seed).shuffle(order)
    n_test, n_val = split_size(test_size, len(order)), split_size(val_size, len(order))
    if n_test + n_val >= len(order):
        raise MedcotError(f"val_size + test_size ask for {n_val + n_test} items but only {len(order)} remain after filtering")
    return {"train": order[n_test + n_val :], "val": order[n_test : n_test + n_val], "test": order[:n_test]}


# --------------------------------------------------------------------------- the stage


@dataclass
class Prepared:
    splits: dict[str, list[Record]]
    eval_sets: dict[str, list[Record]]
    loads: list[LoadReport]
    steps: list[StepReport]

    def drop_table(self):
        import pandas as pd

        rows = [{"step": s.step, "source": s.source, "before": s.before, "dropped": s.dropped, "after": s.after,
                 "why": "; ".join(f"{k}: {v}" for k, v in s.reasons.items())} for s in self.steps]
        return pd.DataFrame(rows)

    def examples(self, split_name: str = "train", n: int = 3):
        import pandas as pd

        rows = [{"id": r.id, "source": r.source, "question": r.question[:160], "reasoning chars": len(r.reasoning or ""),
                 "answer": r.answer[:120], "gold": r.gold} for r in self.splits[split_name][:n]]
        return pd.DataFrame(rows)

    def split_table(self):
        import pandas as pd

        counts = Counter((name, r.source) for name, records in self.splits.items() for r in records)
        table = pd.Series(counts).unstack(fill_value=0)
        table.index.name = "split"
        return table

    def source_table(self):
        import pandas as pd

        rows = [{"source": r.source, "format": r.format, "read": r.read, "kept": r.kept,
                 "skipped": "; ".join(f"{k}: {v}" for k, v in r.skipped.items()),
                 "repaired": "; ".join(f"{k}: {v}" for k, v in r.repaired.items()), "path": r.path} for r in self.loads]
        return pd.DataFrame(rows)


def load_sources(sources: list[DatasetSource]) -> tuple[dict[str, list[Record]], list[LoadReport]]:
    by_source, reports = {}, []
    for source in sources:
        if source.label in by_source:
            raise MedcotError(f"two data sources are both named '{source.label}'; give one a distinct `name:`")
        records, report = load_source(source)
        by_source[source.label] = records
        reports.append(report)
    return by_source, reports


def _distilled_source(source: DatasetSource, run_dir: str | Path | None) -> tuple[DatasetSource | None, str]:
    """The run's distilled set (written by stage 00b) as a medical-o1 file; None, and why, while it has no items."""
    path = Path(run_dir) / "distill" / "distilled.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return None, "not written yet (stage 00b, teacher distillation, writes it)"
    if not read_json(path):
        return None, "stage 00b accepted no teacher generations"
    return source.model_copy(update={"path": str(path), "format": "medical_o1", "name": source.label}), ""


def prepare(cfg: Recipe, run_dir: str | Path | None = None) -> Prepared:
    """Load, filter, deduplicate, decontaminate, mix and split, reporting every drop.

    A `run:distilled` source is read from run_dir once stage 00b has written it; before that it
    contributes nothing, and a mixture made only of it yields empty splits (00b fills them).
    """
    resolved = [_distilled_source(s, run_dir) if s.path == DISTILLED else (s, "") for s in cfg.dataset_mixture]
    pending = {s.label: why for s, (r, why) in zip(cfg.dataset_mixture, resolved, strict=True) if r is None}
    train_sources, train_loads = load_sources([r for r, _ in resolved if r is not None])
    eval_sets, eval_loads = load_sources(cfg.eval_datasets)
    pooled = [r for records in train_sources.values() for r in records]
    steps = []
    for step in (
        lambda rs: quality_filter(rs, cfg.min_cot_chars),
        lambda rs: deduplicate(rs, cfg.near_duplicate_threshold, cfg.seed),
        lambda rs: decontaminate(rs, [e for es in eval_sets.values() for e in es], cfg.decontamination_chars),
    ):
        pooled, report = step(pooled)
        steps.append(report)
    by_source = defaultdict(list)
    for r in pooled:
        by_source[r.source].append(r)
    mixed, mixture_reports = sample_mixture(by_source, cfg.dataset_mixture, cfg.seed)
    steps.extend(mixture_reports)
    steps.extend(StepReport("empty source", label, 0, 0, {why: 0}, []) for label, why in pending.items())
    if not mixed and len(pending) == len(cfg.dataset_mixture):  # only the distilled set, not written yet
        return Prepared({"train": [], "val": [], "test": []}, eval_sets, train_loads + eval_loads, steps)
    if not mixed:
        raise MedcotError(why_nothing_is_left(cfg, train_loads, steps))
    return Prepared(split(mixed, cfg.val_size, cfg.test_size, cfg.seed), eval_sets, train_loads + eval_loads, steps)


# The recipe setting behind each filtering step, named when a step leaves no training items.
STEP_SETTINGS = {"quality": "min_cot_chars", "deduplicate": "near_duplicate_threshold",
                 "decontaminate": "decontamination_chars"}


def _setting(step: str, cfg: Recipe) -> str:
    if step == "mixture":
        return ", ".join(f"dataset_mixture {s.label}: weight={s.weight}, max_samples={s.max_samples}" for s in cfg.dataset_mixture)
    return f"{STEP_SETTINGS[step]}={getattr(cfg, STEP_SETTINGS[step])}"


def why_nothing_is_left(cfg: Recipe, loads: list[LoadReport], steps: list[StepReport]) -> str:
    """Name the step, and the setting, that removed the last training items, with what the step saw."""
    if not sum(load.kept for load in loads):
        sources = "; ".join(f"{load.source} ({load.path}): read {load.read}, kept 0"
                            + "".join(f", skipped {n}: {why}" for why, n in load.skipped.items()) for load in loads)
        return f"no training items are left: the training sources yielded no usable items ({sources})"
    emptied = next((s for s in steps if s.source == "all" and s.before and not s.after), None)
    if emptied is None:  # the per-source mixture sampling took nothing
        emptied = StepReport("mixture", "all", sum(s.before for s in steps if s.step == "mixture"),
                             sum(s.dropped for s in steps if s.step == "mixture"),
                             dict(sum((Counter(s.reasons) for s in steps if s.step == "mixture"), Counter())), [])
    reasons = "; ".join(f"{why}: {n}" for why, n in emptied.reasons.items())
    text = (f"no training items are left: the {emptied.step} step (setting `{_setting(emptied.step, cfg)}`) removed all "
            f"{emptied.before} ({reasons})")
    if emptied.observed:
        text += f"; it saw {emptied.observed}"
    if emptied.examples:
        text += f"; e.g. {', '.join(emptied.examples[:3])}"
    return text


def save_prepared(prepared: Prepared, run_dir: str | Path) -> Path:
    """Write data/{train,val,test}.jsonl, data/eval/<set>.jsonl and the data report."""
    data_dir = Path(run_dir) / "data"
    for name, records in prepared.splits.items():
        write_jsonl(data_dir / f"{name}.jsonl", (r.to_dict() for r in records))
    for name, records in prepared.eval_sets.items():
        write_jsonl(data_dir / "eval" / f"{name}.jsonl", (r.to_dict() for r in records))
    write_json(data_dir / "report.json", {
        "sources": [r.to_dict() for r in prepared.loads],
        "steps": [asdict(s) for s in prepared.steps],
        "splits": {k: len(v) for k, v in prepared.splits.items()},
        "eval_sets": {k: len(v) for k, v in prepared.eval_sets.items()},
    })
    return data_dir


def read_records(path: str | Path) -> list[Record]:
    """Records from a JSONL file that save_prepared wrote (an empty file holds none)."""
    return [Record.from_dict(row) for _, _, row in read_items(path)] if Path(path).stat().st_size else []


def load_prepared_eval(run_dir: str | Path) -> dict[str, list[Record]]:
    """Read the whole eval sets that stage 00 wrote (decontamination checks against all of them)."""
    eval_dir = Path(run_dir) / "data" / "eval"
    if not (Path(run_dir) / "data" / "report.json").is_file():
        raise MedcotError(f"{Path(run_dir) / 'data'}: no prepared data; run stage 00 (dataset inspection) first")
    return {path.stem: records for path in sorted(eval_dir.glob("*.jsonl")) if (records := read_records(path))}


def load_prepared(run_dir: str | Path) -> dict[str, list[Record]]:
    """Read the splits that stage 00 wrote."""
    data_dir = Path(run_dir) / "data"
    if not (data_dir / "train.jsonl").exists():
        raise MedcotError(f"{data_dir}: no prepared data; run stage 00 (dataset inspection) first")
    return {name: records for name in ("train", "val", "test") if (records := read_records(data_dir / f"{name}.jsonl"))}
