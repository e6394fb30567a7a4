"""The baseline stage (01): the untrained base model on the held-out split and on showcase prompts.

Its generations are the "before" half that the evaluation stage compares with the fine-tuned model.
They use the same prompt style, chat template and decoding as every later stage.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from . import generate, models, prompts
from .data import Record
from .export import base_gguf
from .fileio import write_jsonl
from .prompts import SHOWCASE, SHOWCASE_QUESTIONS


def run(cfg, tokenizer, splits: dict[str, list[Record]], run_dir: str | Path) -> list[generate.Generation]:
    """Generate for the held-out test split and the showcase prompts; write generations/01_baseline.jsonl.

    The backend is stage 04's (`generate.resolve_backend`), so stage 04 reuses these generations as its base side.
    """
    records = splits.get("test", []) + SHOWCASE
    style, decoding = prompts.PromptStyle.from_recipe(cfg), generate.Decoding.from_recipe(cfg)
    if generate.resolve_backend(cfg) == "llamacpp":
        generations = generate.generate_gguf(base_gguf(cfg, run_dir), tokenizer, records, style, decoding)
    else:  # hf, and vllm's CPU-free stand-in: the full-precision base through transformers
        generations = generate.generate(models.load_model(cfg, four_bit=False), tokenizer, records, style, decoding)
    write_jsonl(Path(run_dir) / "generations" / "01_baseline.jsonl", (g.to_dict() for g in generations))
    return generations


def metrics(cfg, generations: list[generate.Generation]) -> dict:
    """What stage 01 records: backend and decoding (stage 04 reuses the generations only when both match), lengths."""
    backend = generate.resolve_backend(cfg)
    return {"backend": "llamacpp" if backend == "llamacpp" else "hf",
            "decoding": asdict(generate.Decoding.from_recipe(cfg)), **generate.length_stats(generations)}


def showcase_table(generations: list[generate.Generation]):
    """The showcase questions with the model's reasoning and answer, for display."""
    import pandas as pd

    rows = [{"question": SHOWCASE_QUESTIONS[g.id], "reasoning": g.reasoning, "answer": g.answer, "new tokens": g.new_tokens,
             "stopped": g.stopped} for g in generations if g.id in SHOWCASE_QUESTIONS]
    return pd.DataFrame(rows)
