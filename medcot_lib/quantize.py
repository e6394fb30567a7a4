"""The quantize stage (02): load the base in bitsandbytes 4-bit, measure, save, and prove the reload.

NF4 with double quantization stores most linear weights in 4 bits plus small per-block scales;
layers bitsandbytes leaves alone (embeddings, `lm_head`, norms) keep the compute dtype, which is why
the saving on a small model with a large vocabulary is well under 8x.
"""

from __future__ import annotations

from pathlib import Path

from . import generate, models, prompts
from .data import Record
from .fileio import atomic_dir

GIB = 2**30
# Greedy tokens per showcase prompt in the reload check: a reload that changed any weight shows within the first few
# dozen tokens, and a 4-bit step on a CPU dequantizes every weight (320 tokens x 5 prompts x 2 models took ~40 s here).
RELOAD_CHECK_TOKENS = 64


def footprints(cfg) -> list[dict]:
    """Measured memory footprint of the base in fp32, bf16 and 4-bit (weights and buffers)."""
    rows = []
    for label, dtype, four_bit in (("fp32", "float32", False), ("bf16", "bfloat16", False),
                                   (f"4-bit {cfg.bnb_4bit_quant_type}", cfg.dtype, True)):
        model = models.load_model(cfg.model_copy(update={"dtype": dtype}), four_bit=four_bit)
        rows.append({"precision": label, "bytes": model.get_memory_footprint(), "GiB": round(model.get_memory_footprint() / GIB, 3)})
        del model
    for row in rows:
        row["vs fp32"] = round(rows[0]["bytes"] / row["bytes"], 2)
    return rows


def save(model, tokenizer, run_dir: str | Path) -> Path:
    """Save the 4-bit checkpoint (weights, quantization config, tokenizer) to run_dir/quantized."""
    target = Path(run_dir) / "quantized"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def reload(path: str | Path):
    """Load a saved 4-bit checkpoint; its config carries the quantization settings."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def reload_check(model, reloaded, tokenizer, records: list[Record], style: prompts.PromptStyle, decoding: generate.Decoding) -> dict:
    """Greedy outputs of the in-memory and the reloaded 4-bit model (up to RELOAD_CHECK_TOKENS each), and whether they are identical."""
    greedy = generate.Decoding(min(decoding.max_new_tokens, RELOAD_CHECK_TOKENS), False, decoding.temperature, decoding.top_p, decoding.batch_size, decoding.seed)
    before = generate.generate(model, tokenizer, records, style, greedy, progress=False)
    after = generate.generate(reloaded, tokenizer, records, style, greedy, progress=False)
    pairs = [{"id": a.id, "in_memory": a.output, "reloaded": b.output, "identical": a.output == b.output} for a, b in zip(before, after, strict=True)]
    return {"identical": all(p["identical"] for p in pairs), "max_new_tokens": greedy.max_new_tokens, "pairs": pairs}


def ensure_identical(check: dict) -> None:
    """Fail the stage when the reloaded checkpoint does not reproduce the in-memory model."""
    from .errors import MedcotError

    differing = [p["id"] for p in check["pairs"] if not p["identical"]]
    if differing:
        raise MedcotError(f"the reloaded 4-bit checkpoint differs from the in-memory model on {differing}; the saved file is not trustworthy")
