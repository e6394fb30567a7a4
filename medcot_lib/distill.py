"""Teacher CoT distillation (stage 00b): a larger reasoning model writes the chain of thought.

For each question the teacher answers in its own chat template and thinking mode. Its final
answer is read with the evaluation stage's extractor and the reasoning is kept only when the
answer matches the gold answer (rejection sampling, up to `distill_attempts` sampled tries).
Every generation is appended to a cache keyed by question, teacher and attempt, so an
interrupted run resumes where it stopped: nothing is generated twice and nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import data, metrics, models, prompts
from .answers import extract
from .data import YES_NO_MAYBE, Record
from .errors import MedcotError, input_error
from .fileio import sha256_file, write_json

CACHE = Path("distill") / "cache.jsonl"
OUTPUT = Path("distill") / "distilled.json"
STATS = Path("distill") / "stats.json"


def question_key(record: Record) -> str:
    """Stable id of a question's content (text, context and options), whatever its source id."""
    content = json.dumps([record.question, record.context, record.options], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def attempt_seed(seed: int, key: str, attempt: int) -> int:
    """A sampling seed per (question, attempt): a resumed run draws exactly what an uninterrupted one would."""
    return int(hashlib.sha256(f"{seed}:{key}:{attempt}".encode()).hexdigest()[:8], 16)


def verifiable(record: Record) -> bool:
    return bool(record.options and record.gold in record.options) or (not record.options and record.gold in YES_NO_MAYBE)


# --------------------------------------------------------------------------- questions


def select_questions(cfg, eval_records: list[Record]) -> tuple[list[Record], list[data.StepReport]]:
    """The distill sources, decontaminated against the eval sets, sampled by weight and cap."""
    by_source, _ = data.load_sources(cfg.distill_sources)
    steps, pooled = [], []
    for label, records in by_source.items():
        kept, report = data.decontaminate(records, eval_records, cfg.decontamination_chars)
        report.source = label
        steps.append(report)
        if not cfg.distill_keep_unverified:
            dropped = [(r, "no gold answer to verify against (distill_keep_unverified is false)", "") for r in kept if not verifiable(r)]
            kept = [r for r in kept if verifiable(r)]
            steps.append(data.step_report("verifiable", label, len(kept) + len(dropped), dropped))
        pooled.append((label, kept))
    chosen, mixture = data.sample_mixture(dict(pooled), cfg.distill_sources, cfg.seed)
    if not chosen:
        raise MedcotError("distill_sources left no questions to distill after decontamination and sampling; see the drop table")
    return chosen, steps + mixture


# --------------------------------------------------------------------------- teachers


@dataclass
class Teacher:
    identity: str  # what the cache records: backend, model and (for a file) its content hash
    chunk: int  # questions generated between cache writes
    _generate: object
    _count: object
    close: object  # frees the model

    def generate(self, records: list[Record], seeds: list[int]) -> list[tuple[str, int, bool]]:
        """(output text, new tokens, stopped at end of turn) per record."""
        return self._generate(records, seeds)

    def tokens(self, text: str) -> int:
        return self._count(text)


def gguf_path(reference: str) -> Path:
    if reference.startswith(models.EMBEDDED_PREFIX):
        return models.embedded_gguf_path(reference)
    path = Path(reference).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise MedcotError(f"teacher_model '{reference}': teacher_backend llamacpp needs a .gguf file or an embedded: model")
    return path


def _llamacpp_teacher(cfg) -> Teacher:
    from .llamacpp import open_chat_model

    path = gguf_path(cfg.teacher_model)
    try:
        llm = open_chat_model(path, n_ctx=cfg.max_length + cfg.distill_max_new_tokens, seed=cfg.seed)
    except (ValueError, RuntimeError) as exc:
        raise MedcotError(f"teacher_model '{cfg.teacher_model}': llama.cpp cannot load {path}: {exc}") from exc

    def run(records, seeds):
        out = []
        for record, seed in zip(records, seeds, strict=True):
            # The GGUF's own chat template (llama-cpp-python renders it), so the teacher sees its native format.
            system = [{"role": "system", "content": cfg.teacher_system_prompt}] if cfg.teacher_system_prompt else []
            reply = llm.create_chat_completion([*system, {"role": "user", "content": prompts.user_message(record)}],
                                               max_tokens=cfg.distill_max_new_tokens, temperature=cfg.distill_temperature,
                                               top_p=cfg.distill_top_p, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=seed)
            choice = reply["choices"][0]
            out.append((choice["message"]["content"] or "", reply["usage"]["completion_tokens"], choice["finish_reason"] == "stop"))
        return out

    identity = f"llamacpp:{path.name}@{sha256_file(path)[:16]}"
    return Teacher(identity, 1, run, lambda text: len(llm.tokenize(text.encode(), add_bos=False, special=False)), llm.close)


def _hf_teacher(cfg) -> Teacher:
    from . import generate

    teacher_cfg = cfg.model_copy(update={"model_name_or_path": cfg.teacher_model, "load_in_4bit": cfg.teacher_load_in_4bit})
    tokenizer = models.load_tokenizer(cfg.teacher_model, trust_remote_code=cfg.trust_remote_code)
    model = models.load_model(teacher_cfg)
    # The teacher's own template with its thinking mode on (templates without one ignore the flag).
    style = prompts.PromptStyle("native", cfg.teacher_system_prompt, {"enable_thinking": True})

    def run(records, seeds):
        decoding = generate.Decoding(cfg.distill_max_new_tokens, True, cfg.distill_temperature, cfg.distill_top_p,
                                     cfg.generation_batch_size, seeds[0])
        results = generate.generate(model, tokenizer, records, style, decoding, progress=False)
        return [(g.output, g.new_tokens, g.stopped) for g in results]

    four_bit = "-4bit" if cfg.teacher_load_in_4bit else ""
    return Teacher(f"hf:{models.resolve(cfg.teacher_model)}{four_bit}", cfg.generation_batch_size, run,
                   lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]), lambda: None)


def load_teacher(cfg) -> Teacher:
    return _llamacpp_teacher(cfg) if cfg.teacher_backend == "llamacpp" else _hf_teacher(cfg)


# --------------------------------------------------------------------------- the cache


class Cache:
    """Append-only JSONL of generations, one line per (question, attempt), for one teacher."""

    def __init__(self, path: Path, teacher: str):
        self.path, self.teacher = path, teacher
        self.rows: dict[tuple[str, int], dict] = {}
        self.discarded_partial_line = False
        if path.is_file():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        complete, _, tail = raw.rpartition(b"\n")
        if tail.strip():  # the process died while writing its last line: that generation is redone
            self.discarded_partial_line = True
            with open(self.path, "r+b") as f:
                f.truncate(len(complete) + 1 if complete else 0)
        for line, text in enumerate(complete.decode("utf-8").splitlines() if complete else [], start=1):
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise input_error(f"corrupt cache line ({exc.msg}); delete the cache to start over", file=self.path, line=line) from None
            if row.get("teacher") != self.teacher:
                raise input_error(f"cache written by teacher {row.get('teacher')!r}, this run's teacher is {self.teacher!r}; "
                                  "refusing to mix teachers (use another run directory or delete the cache)",
                                  file=self.path, line=line, field="teacher")
            self.rows[(row["key"], row["attempt"])] = row

    def get(self, key: str, attempt: int) -> dict | None:
        return self.rows.get((key, attempt))

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[(row["key"], row["attempt"])] = row


# --------------------------------------------------------------------------- rejection sampling


def judge(record: Record, output: str) -> dict:
    """Read the teacher's answer; accept only a closed reasoning block and an answer equal to gold."""
    options = record.options if record.options else None
    found = extract(output, options=options, decision=options is None and record.gold in YES_NO_MAYBE)
    if found.status in ("empty", "truncated"):
        verdict = found.status
    elif not found.reasoning:
        verdict = "no reasoning block"
    elif found.status != "ok":
        verdict = found.status
    elif not verifiable(record):
        verdict = "unverified"
    else:
        verdict = "accepted" if found.answer == record.gold else "wrong answer"
    return {"extracted": found.answer, "verdict": verdict, "reasoning": found.reasoning, "final": found.final}


def distill(cfg, run_dir: str | Path, teacher: Teacher, questions: list[Record], *, progress: bool = True) -> list[dict]:
    """Generate until each question is accepted or out of attempts; return one outcome per question."""
    from tqdm.auto import tqdm

    if cfg.distill_attempts < 1:
        raise MedcotError(f"distill_attempts is {cfg.distill_attempts}; at least one attempt is needed")
    cache = Cache(Path(run_dir) / CACHE, teacher.identity)
    keys = [question_key(q) for q in questions]
    done: dict[str, dict] = {}
    bar = tqdm(total=len(questions), desc="distilling", unit="question", disable=not progress)
    for attempt in range(1, cfg.distill_attempts + 1):
        # Questions without a gold answer get one attempt: there is nothing to reject them against.
        pending = [(k, q) for k, q in zip(keys, questions, strict=True)
                   if k not in done and (attempt == 1 or verifiable(q))]
        missing = [(k, q) for k, q in pending if cache.get(k, attempt) is None]
        for start in range(0, len(missing), teacher.chunk):
            chunk = missing[start : start + teacher.chunk]
            outputs = teacher.generate([q for _, q in chunk], [attempt_seed(cfg.seed, k, attempt) for k, _ in chunk])
            for (key, question), (text, new_tokens, stopped) in zip(chunk, outputs, strict=True):
                cache.append({"key": key, "attempt": attempt, "teacher": teacher.identity, "id": question.id,
                              "source": question.source, "output": text, "new_tokens": new_tokens, "stopped": stopped})
        for key, question in pending:
            row = cache.get(key, attempt)
            verdict = judge(question, row["output"])
            final = verdict["verdict"] in ("accepted", "unverified") or attempt == cfg.distill_attempts or not verifiable(question)
            if final:
                done[key] = {"record": question, "attempt": attempt, "row": row, **verdict}
                bar.update(1)
    bar.close()
    return [done[k] for k in keys]


def kept(cfg, outcomes: list[dict]) -> list[dict]:
    """Outcomes that become training data: accepted ones, plus unverified ones when the recipe allows."""
    allowed = {"accepted", "unverified"} if cfg.distill_keep_unverified else {"accepted"}
    return [o for o in outcomes if o["verdict"] in allowed]


def to_medical_o1(outcome: dict, teacher: str) -> dict:
    """A distilled item in the medical-o1 schema, with where it came from."""
    record = outcome["record"]
    return {"Question": prompts.user_message(record), "Complex_CoT": outcome["reasoning"], "Response": outcome["final"],
            "source": record.source, "source_id": record.id, "gold": record.gold, "teacher": teacher,
            "attempt": outcome["attempt"], "verified": outcome["verdict"] == "accepted"}


def stats(outcomes: list[dict], teacher: Teacher) -> dict:
    """Per source: acceptance rate, attempts used, why items were rejected, and reasoning length in teacher tokens."""
    by_source: dict[str, list[dict]] = {}
    for o in outcomes:
        by_source.setdefault(o["record"].source, []).append(o)
    table = {}
    for source, group in by_source.items():
        accepted = [o for o in group if o["verdict"] == "accepted"]
        table[source] = {
            "questions": len(group),
            "accepted": len(accepted),
            "acceptance": metrics.accuracy([o["verdict"] == "accepted" for o in group]).to_dict(),
            "attempts_used": dict(sorted(Counter(o["attempt"] for o in group).items())),
            "verdicts": dict(Counter(o["verdict"] for o in group)),
            "reasoning_tokens_accepted": metrics.describe_lengths([teacher.tokens(o["reasoning"]) for o in accepted]),
        }
    return {"teacher": teacher.identity, "questions": len(outcomes), "sources": table}


def stats_table(summary: dict):
    import pandas as pd

    return pd.DataFrame([{"source": s, "questions": v["questions"], "accepted": v["accepted"],
                          "acceptance (95% CI)": metrics.ci_text(v["acceptance"]), "attempts used": v["attempts_used"],
                          "verdicts": v["verdicts"], "median reasoning tokens": v["reasoning_tokens_accepted"]["median"]}
                         for s, v in summary["sources"].items()])


def write_outputs(cfg, run_dir: str | Path, outcomes: list[dict], teacher: Teacher) -> dict:
    """distill/distilled.json (medical-o1 schema + provenance) and distill/stats.json, written atomically."""
    summary = stats(outcomes, teacher)
    rows = [to_medical_o1(o, teacher.identity) for o in kept(cfg, outcomes)]
    summary["kept"] = len(rows)
    write_json(Path(run_dir) / OUTPUT, rows)
    write_json(Path(run_dir) / STATS, summary)
    return summary
