"""The evaluation stage (04): base vs fine-tuned on the same prompts, scored honestly, with CIs.

Both models see the same rendered prompts (the training template) and the same decoding. Every
output is kept: an empty, truncated or unparseable answer counts as wrong, and the rate of such
outputs is reported per model and set. Every figure carries its n and a 95% bootstrap CI, and the
base-vs-fine-tuned difference is paired (McNemar for accuracy, paired bootstrap for the rest).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import export, generate, metrics, models, prompts, random_models
from .answers import extract, well_formed
from .data import YES_NO_MAYBE, Record, read_items, read_records
from .errors import MedcotError, input_error
from .fileio import read_json, write_json, write_jsonl, write_text
from .prompts import SHOWCASE

MODELS = ("base", "fine-tuned")
HEADLINE = {"mcq": "accuracy", "decision": "accuracy", "open": "rouge_l"}  # the metric a set is ranked by
HELD_OUT = "heldout"  # the run's own test split, scored open-ended against its reference responses


@dataclass
class EvalSet:
    name: str
    kind: str  # mcq | decision (yes/no/maybe) | open (reference text)
    records: list[Record]
    total: int  # items in the set before any subsample
    path: str

    @property
    def decision(self) -> bool:
        return self.kind == "decision"


# --------------------------------------------------------------------------- eval sets


def _kind(record: Record) -> str:
    if record.options:
        return "mcq"
    return "decision" if record.gold in YES_NO_MAYBE else "open"


def check_eval_set(name: str, records: list[Record], path: str | Path, *, open_allowed: bool) -> str:
    """The set's kind; gold answers must exist and fit the options, and one set holds one kind."""
    if not records:
        raise input_error(f"eval set '{name}' is empty", file=path, expected="at least one item")
    kinds = {_kind(r) for r in records}
    if len(kinds) > 1:
        raise input_error(f"eval set '{name}' mixes item kinds ({', '.join(sorted(kinds))})", file=path,
                          expected="one kind per set: multiple choice, yes/no/maybe, or open-ended")
    kind = kinds.pop()
    for line, r in enumerate(records, start=1):
        if kind == "mcq" and r.gold not in r.options:
            raise input_error(f"item {r.id}: gold answer {r.gold!r} is not one of the option letters {sorted(r.options)}",
                              file=path, line=line, field="gold", expected="an option letter")
        if kind == "open" and not open_allowed:
            raise input_error(f"item {r.id} has no gold answer", file=path, line=line, field="gold",
                              expected="an option letter or yes/no/maybe; only the held-out split may be open-ended")
        if kind == "open" and not r.answer.strip():
            raise input_error(f"item {r.id} has no reference answer", file=path, line=line, field="answer",
                              expected="a non-empty reference response")
    return kind


def subsample(records: list[Record], size: int | None, seed: int, name: str) -> list[Record]:
    """A fixed-size, seeded subsample (order preserved); the same seed gives the same items on any machine."""
    if size is None or size >= len(records):
        return records
    chosen = sorted(random.Random(f"{seed}:{name}").sample(range(len(records)), size))
    return [records[i] for i in chosen]


def load_eval_sets(cfg, run_dir: str | Path) -> list[EvalSet]:
    """The recipe's eval sets as stage 00 wrote them, subsampled where max_samples asks, plus the held-out split."""
    data_dir = Path(run_dir) / "data"
    sets = []
    for source in cfg.eval_datasets:
        path = data_dir / "eval" / f"{source.label}.jsonl"
        if not path.is_file():
            raise MedcotError(f"{path}: eval set '{source.label}' was not prepared; run stage 00 (dataset inspection) first")
        records = read_records(path)
        kind = check_eval_set(source.label, records, path, open_allowed=False)
        chosen = subsample(records, source.max_samples, cfg.eval_subsample_seed, source.label)
        sets.append(EvalSet(source.label, kind, chosen, len(records), str(path)))
    if cfg.eval_test_split:
        path = data_dir / "test.jsonl"
        if not path.is_file():
            raise MedcotError(f"{path}: no held-out split; run stage 00 (dataset inspection) first")
        records = read_records(path)
        if records:
            # Held-out items are asked exactly as training asked them (options included) and scored open-ended
            # against the final answer training taught, whatever their source.
            records = [replace(r, answer=prompts.final_answer(r)) for r in records]
            check_eval_set(HELD_OUT, [replace(r, options=None, gold=None) for r in records], path, open_allowed=True)
            sets.append(EvalSet(HELD_OUT, "open", records, len(records), str(path)))
    if not sets:
        raise MedcotError(f"nothing to evaluate: the recipe lists no eval_datasets, and {NOTHING_HELD_OUT}")
    return sets


def set_table(sets: list[EvalSet]):
    import pandas as pd

    return pd.DataFrame([{"set": s.name, "kind": s.kind, "n evaluated": len(s.records), "n in set": s.total, "file": s.path}
                         for s in sets])


# --------------------------------------------------------------------------- generation


def check_adapter_fits(cfg, adapter: Path) -> None:
    """The adapter must have been trained on this recipe's base model."""
    saved = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    expected = models.resolve(cfg.model_name_or_path)
    if saved != expected:
        raise input_error(f"the adapter was trained on '{saved}', but this recipe's base model is '{expected}'",
                          file=adapter / "adapter_config.json", field="base_model_name_or_path",
                          expected="an adapter trained by stage 03 of this run")


def attach_adapter(model, adapter: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise MedcotError(f"{adapter}: the adapter does not fit the base model ({str(exc).splitlines()[0]}); "
                          f"was it trained with another model_name_or_path?") from exc


def reusable_baseline(cfg, run_dir: str | Path, backend: str) -> dict[str, generate.Generation]:
    """Stage 01's generations, by prompt, when they were made with this evaluation's backend, precision and decoding."""
    path, stats = Path(run_dir) / "generations" / "01_baseline.jsonl", Path(run_dir) / "metrics" / "01_baseline.json"
    if (backend == "hf" and cfg.load_in_4bit) or not path.is_file() or not stats.is_file():  # 01 runs the full-precision base
        return {}
    made = read_json(stats)
    if made.get("backend", "hf") != backend or made.get("decoding") != asdict(generate.Decoding.from_recipe(cfg)):
        return {}
    return {row["prompt"]: generate.Generation(**row) for _, _, row in read_items(path)}


def _base_generations(reused: dict, records: list[Record], tokenizer, style, generate_fn) -> tuple[list, int]:
    """The base model's generations: stage 01's where it made them for the same prompt, the rest made by generate_fn."""
    rendered = [prompts.render(r, tokenizer, style, with_target=False).prompt for r in records]
    todo = [i for i, prompt in enumerate(rendered) if prompt not in reused]
    fresh = generate_fn([records[i] for i in todo]) if todo else []
    base = [reused.get(prompt) for prompt in rendered]
    for i, generation in zip(todo, fresh, strict=True):
        base[i] = generation
    return base, len(records) - len(todo)


def _hf_generations(cfg, run_dir, records: list[Record], tokenizer, progress: bool) -> dict[str, list[generate.Generation]]:
    """Base and base + adapter from one loaded model: the adapter is switched off for the base."""
    adapter = export.adapter_dir(run_dir)
    check_adapter_fits(cfg, adapter)
    style, decoding = prompts.PromptStyle.from_recipe(cfg), generate.Decoding.from_recipe(cfg)
    model = attach_adapter(models.load_model(cfg), adapter)

    def base_model_generations(todo: list[Record]) -> list[generate.Generation]:
        with model.disable_adapter():
            return generate.generate(model, tokenizer, todo, style, decoding, progress=progress)

    base, reused = _base_generations(reusable_baseline(cfg, run_dir, "hf"), records, tokenizer, style, base_model_generations)
    tuned = generate.generate(model, tokenizer, records, style, decoding, progress=progress)
    return {"base": base, "fine-tuned": tuned, "reused_from_01": reused}


def _llamacpp_generations(cfg, run_dir, records, tokenizer, progress) -> dict[str, list[generate.Generation]]:
    """F16 GGUFs of the base and of the merged model, run by llama.cpp with the same rendered prompts."""
    export.adapter_dir(run_dir)
    base = export.base_gguf(cfg, run_dir)
    merged = Path(run_dir) / "eval" / "gguf" / "merged-f16.gguf"
    if not merged.is_file():
        merged_checkpoint = export.merge(cfg, run_dir)
        export.ensure_merge_ok(export.check_merge(cfg, run_dir))  # a broken merge would silently change the "fine-tuned" side
        export.to_gguf(merged_checkpoint, merged, "f16")
    style, decoding = prompts.PromptStyle.from_recipe(cfg), generate.Decoding.from_recipe(cfg)
    base_generations, reused = _base_generations(
        reusable_baseline(cfg, run_dir, "llamacpp"), records, tokenizer, style,
        lambda todo: generate.generate_gguf(base, tokenizer, todo, style, decoding, progress=progress))
    tuned = generate.generate_gguf(merged, tokenizer, records, style, decoding, progress=progress)
    return {"base": base_generations, "fine-tuned": tuned, "reused_from_01": reused}


def _vllm_generations(cfg, run_dir, records, tokenizer, progress) -> dict[str, list[generate.Generation]]:
    """vLLM on a CUDA GPU, serving the adapter beside the base without a merge."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        raise MedcotError("eval_backend: vllm needs a CUDA GPU and the vllm package; use hf (exact) or llamacpp (fast on CPU)")
    if cfg.use_dora:
        raise MedcotError("eval_backend: vllm does not serve DoRA adapters; use hf")
    adapter = export.adapter_dir(run_dir)
    check_adapter_fits(cfg, adapter)
    style, decoding = prompts.PromptStyle.from_recipe(cfg), generate.Decoding.from_recipe(cfg)
    return {**generate.generate_vllm(cfg, adapter, tokenizer, records, style, decoding), "reused_from_01": 0}


BACKENDS = {"hf": _hf_generations, "llamacpp": _llamacpp_generations, "vllm": _vllm_generations}


def generate_both(cfg, run_dir: str | Path, sets: list[EvalSet], *, progress: bool = True) -> dict:
    """Generations of both models for every eval item, then the showcase prompts, in that order.

    Returns {"items": [(set name, record)], "base": [...], "fine-tuned": [...], ...}, all aligned.
    """
    items = [(s.name, r) for s in sets for r in s.records] + [("showcase", r) for r in SHOWCASE]
    tokenizer = models.load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    result = BACKENDS[generate.resolve_backend(cfg)](cfg, run_dir, [r for _, r in items], tokenizer, progress)
    return {"items": items, "tokenizer": tokenizer, **result}


# --------------------------------------------------------------------------- scoring


def score(eval_set: EvalSet, generation: generate.Generation, record: Record, model: str, tokenizer) -> dict:
    """One row per (model, item): the output kept whole, what was read from it, and whether it is right."""
    prefilled = generation.prompt.rstrip().endswith(prompts.THINK_OPEN)
    found = extract(generation.output, options=record.options if eval_set.kind == "mcq" else None,
                    decision=eval_set.decision)
    row = {"set": eval_set.name, "kind": eval_set.kind, "model": model, "id": record.id, "question": record.question,
           "output": generation.output, "final": found.final, "answer": found.answer, "status": found.status,
           "gold": record.gold if eval_set.kind != "open" else record.answer,
           "well_formed": well_formed(generation.output, prefilled_think=prefilled),
           "reasoning_tokens": len(tokenizer(found.reasoning, add_special_tokens=False)["input_ids"]) if found.reasoning else 0,
           "new_tokens": generation.new_tokens, "stopped": generation.stopped}
    if eval_set.kind == "open":
        row.update(rouge_l=metrics.rouge_l(found.final, record.answer), token_f1=metrics.token_f1(found.final, record.answer))
    else:
        row["correct"] = found.answer is not None and found.answer == record.gold
    return row


def score_all(sets: list[EvalSet], generations: dict) -> list[dict]:
    """Score both models on every eval item (the showcase prompts have no gold and are not scored)."""
    by_name = {s.name: s for s in sets}
    return [score(by_name[name], generations[model][i], record, model, generations["tokenizer"])
            for i, (name, record) in enumerate(generations["items"]) if name in by_name for model in MODELS]


def _rows(rows: list[dict], set_name: str, model: str) -> list[dict]:
    return [r for r in rows if r["set"] == set_name and r["model"] == model]


def model_metrics(kind: str, rows: list[dict], resamples: int) -> dict:
    """Every metric of one model on one set, each with n and a 95% CI."""
    kw = {"resamples": resamples}
    failed = [r["answer"] is None for r in rows] if kind != "open" else [not r["final"].strip() for r in rows]
    out = {"n": len(rows),
           "format_compliance": metrics.accuracy([r["well_formed"] for r in rows], **kw).to_dict(),
           "extraction_failure_rate": metrics.accuracy(failed, **kw).to_dict(),
           "truncated_rate": metrics.accuracy([not r["stopped"] for r in rows], **kw).to_dict(),
           "reasoning_tokens": metrics.describe_lengths([r["reasoning_tokens"] for r in rows if r["reasoning_tokens"]]),
           "failures": {status: sum(r["status"] == status for r in rows) for status in ("empty", "truncated", "unparsed", "ambiguous")}}
    if kind == "open":
        out["rouge_l"] = metrics.estimate([r["rouge_l"] for r in rows], **kw).to_dict()
        out["token_f1"] = metrics.estimate([r["token_f1"] for r in rows], **kw).to_dict()
    else:
        out["accuracy"] = metrics.accuracy([r["correct"] for r in rows], **kw).to_dict()
    if kind == "decision":
        out["macro_f1"] = metrics.macro_f1_estimate([r["gold"] for r in rows], [r["answer"] for r in rows], YES_NO_MAYBE, **kw).to_dict()
    return out


def paired_differences(kind: str, base: list[dict], tuned: list[dict], resamples: int) -> dict:
    """Fine-tuned minus base on the same items: McNemar for the yes/no rates (accuracy, format compliance),
    paired bootstrap for the rest."""
    kw = {"resamples": resamples}
    out = {"format_compliance": metrics.paired_accuracy_difference([r["well_formed"] for r in base],
                                                                   [r["well_formed"] for r in tuned], **kw)}
    if kind == "open":
        for key in ("rouge_l", "token_f1"):
            out[key] = metrics.paired_bootstrap([r[key] for r in base], [r[key] for r in tuned], **kw)
        return out
    out["accuracy"] = metrics.paired_accuracy_difference([r["correct"] for r in base], [r["correct"] for r in tuned], **kw)
    if kind == "decision":
        out["macro_f1"] = metrics.paired_bootstrap([(r["gold"], r["answer"]) for r in base],
                                                   [(r["gold"], r["answer"]) for r in tuned],
                                                   metrics.macro_f1_over_rows(YES_NO_MAYBE), **kw)
    return out


def summarise(sets: list[EvalSet], rows: list[dict], resamples: int) -> dict:
    summary = {}
    for s in sets:
        base, tuned = _rows(rows, s.name, "base"), _rows(rows, s.name, "fine-tuned")
        summary[s.name] = {"kind": s.kind, "headline": HEADLINE[s.kind], "n": len(s.records), "n_in_set": s.total,
                           "base": model_metrics(s.kind, base, resamples), "fine-tuned": model_metrics(s.kind, tuned, resamples),
                           "difference": paired_differences(s.kind, base, tuned, resamples)}
    return summary


def metrics_table(summary: dict):
    """One row per set and metric: base, fine-tuned (each with its CI), the paired difference and its test."""
    import pandas as pd

    rows = []
    for name, entry in summary.items():
        keys = ["accuracy", "macro_f1"] if entry["kind"] != "open" else ["rouge_l", "token_f1"]
        for key in [*keys, "format_compliance", "extraction_failure_rate"]:
            if key not in entry["base"]:
                continue
            diff = entry["difference"].get(key)
            rows.append({"set": name, "n": entry["n"], "metric": key, "base": metrics.ci_text(entry["base"][key]),
                         "fine-tuned": metrics.ci_text(entry["fine-tuned"][key]),
                         "difference": metrics.ci_text(diff, signed=True) if diff else "",
                         "p": f"{diff['p_value']:.3g} ({diff['test']})" if diff else ""})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- report


def side_by_side(generations: dict, per_set: int):
    """Prompt, base output, fine-tuned output and gold for the showcase and the first items of each set."""
    import pandas as pd

    shown, rows = {}, []
    for i, (name, record) in enumerate(generations["items"]):
        shown[name] = shown.get(name, 0) + 1
        if name == "showcase" or shown[name] <= per_set:
            rows.append({"set": name, "prompt": prompts.user_message(record), "base": generations["base"][i].output,
                         "fine-tuned": generations["fine-tuned"][i].output, "gold": record.gold or record.answer or "-"})
    return pd.DataFrame(rows)


def _markdown_cells(table):
    """Multi-line text in one markdown table cell: line breaks as <br>, pipes escaped."""
    return table.map(lambda v: v.replace("|", "\\|").replace("\n", "<br>") if isinstance(v, str) else v)


def write_outputs(run_dir: str | Path, rows: list[dict], summary: dict, table, pairs, settings: dict) -> Path:
    """eval/generations.jsonl, eval/metrics.json, eval/report.md and the side-by-side table (md and html)."""
    out = Path(run_dir) / "eval"
    write_jsonl(out / "generations.jsonl", rows)
    write_json(out / "metrics.json", {"settings": settings, "sets": summary})
    pairs_md = _markdown_cells(pairs).to_markdown(index=False)
    write_text(out / "side_by_side.md", pairs_md)
    write_text(out / "side_by_side.html", pairs.to_html(index=False, escape=True))
    report = ["# Evaluation: base vs fine-tuned", "", "> Educational and research use only; not for clinical use.", "",
              "Same prompts, template and decoding for both models. Every output is kept: empty, truncated and",
              "unparseable answers count as wrong. 95% bootstrap CIs; paired differences (fine-tuned minus base).", "",
              "## Settings", "", *(f"- {k}: {v}" for k, v in settings.items()), "",
              "## Metrics", "", table.to_markdown(index=False), "", "## Side by side", "", pairs_md, ""]
    return write_text(out / "report.md", "\n".join(report))


NOTHING_HELD_OUT = "no held-out split is scored (test_size: 0, or eval_test_split: false); add eval_datasets or a test split"


def nothing_to_evaluate(cfg) -> bool:
    """Stage 04 would have no set: no eval datasets, and no held-out split scored."""
    return not cfg.eval_datasets and (not cfg.eval_test_split or cfg.test_size == 0)


def settings(cfg, generations: dict) -> dict:
    backend = generate.resolve_backend(cfg)
    return {"backend": backend, **random_models.weights(cfg.model_name_or_path), "prompt_style": cfg.prompt_style,
            "decoding": asdict(generate.Decoding.from_recipe(cfg)), "base_in_4bit": cfg.load_in_4bit and backend == "hf",
            "bootstrap_resamples": cfg.bootstrap_resamples, "subsample_seed": cfg.eval_subsample_seed,
            "base_generations_reused_from_01": generations["reused_from_01"]}


def training_log(run_dir: str | Path) -> list[dict]:
    """Stage 03's logged losses, for the loss curves beside the evaluation."""
    state = Path(run_dir) / "adapter" / "trainer_state.json"
    if not state.is_file():
        raise MedcotError(f"{state}: no training log; run stage 03 (QLoRA train) first")
    return read_json(state)["log_history"]
