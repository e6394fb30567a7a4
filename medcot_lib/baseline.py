"""The baseline stage (01): the untrained base model on the held-out split and on showcase prompts.

Its generations are the "before" half that the evaluation stage compares with the fine-tuned model.
They use the same prompt style, chat template and decoding as every later stage.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from . import generate, models, prompts
from .data import Record
from .fileio import write_jsonl

# Showcase questions, written for medcot, covering the seed projects' teaching themes. Educational only.
_SHOWCASE_QUESTIONS = {
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
SHOWCASE = [Record(id=key, source="showcase", question=text, answer="") for key, text in _SHOWCASE_QUESTIONS.items()]


def run(cfg, tokenizer, splits: dict[str, list[Record]], run_dir: str | Path) -> list[generate.Generation]:
    """Generate for the held-out test split and the showcase prompts; write generations/01_baseline.jsonl.

    The backend is stage 04's (`generate.resolve_backend`), so stage 04 reuses these generations as its base side.
    """
    from .export import base_gguf  # export imports SHOWCASE from here

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

    rows = [{"question": _SHOWCASE_QUESTIONS[g.id], "reasoning": g.reasoning, "answer": g.answer, "new tokens": g.new_tokens,
             "stopped": g.stopped} for g in generations if g.id in _SHOWCASE_QUESTIONS]
    return pd.DataFrame(rows)
