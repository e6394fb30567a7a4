"""Merge the adapter into a full-precision base, and check the saved checkpoint against base + adapter.

Merge. The adapter is merged into a full-precision reload of the base (fp32, bf16 or fp16), never into 4-bit
weights: one NF4 step is far larger than a typical LoRA update, so re-quantizing W + BA to 4 bits rounds most
of the update away. A QLoRA adapter was trained against the dequantized NF4 weights; merged into the original
weights it sits on W instead of NF4(W), the standard QLoRA deployment recipe.

Tied embeddings. On a model whose `lm_head` shares its weight with the input embeddings (the embedded
SmolLM2), merging an `lm_head` (or `embed_tokens`) adapter writes the update into the shared tensor and so
changes the input embeddings as well (PEFT warns about this, huggingface/peft#2777). `merge` gives the output
layer its own copy first and re-ties the two only if the merge left them equal; the merge check compares
the saved checkpoint with base + adapter, so a wrong merge cannot pass unnoticed.
"""

from __future__ import annotations

from pathlib import Path

from .. import models, prompts
from ..data import Record
from ..errors import MedcotError
from ..fileio import atomic_dir
from ..prompts import SHOWCASE
from .disk import check_disk
from .inputs import (
    _check_adapter_base,
    _dtype_name,
    adapter_dir,
    adapter_summary,
    base_checkpoint,
    export_dtype,
)
from .paths import merged_dir

# Largest |logit difference| between base + adapter and the saved merged checkpoint (both run in fp32) that
# still counts as the same model. Measured on the embedded model with a perturbed all-projection + lm_head
# adapter: 1e-4 when merged in fp32, 0.044 in fp16, 0.32 in bf16 (the rounding of W + BA to 16 bits, no
# larger than rounding the base alone); a wrong tied-embedding merge differs by 1.4.
MERGE_TOLERANCE = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.75}


def _tie_flag(model, value: bool) -> None:
    configs = {id(model.config): model.config}
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None:
        configs[id(text)] = text
    for config in configs.values():
        config.tie_word_embeddings = value


def _untie_embeddings(model) -> bool:
    """Give the output layer its own copy of tied input embeddings; returns whether they were tied."""
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    _tie_flag(model, False)
    return True


def _retie_if_equal(model) -> bool:
    """Tie the output layer back to the input embeddings when the merge left them equal; returns whether it did."""
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or not torch.equal(out.weight, inp.weight):
        return False
    out.weight = inp.weight
    _tie_flag(model, True)
    return True


def _load_full_precision(cfg, dtype):
    """The base in `dtype`, never 4-bit whatever the recipe trained with, with tied embeddings untied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_checkpoint(cfg), dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    _untie_embeddings(model)
    return model


def _with_adapter(model, adapter: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise MedcotError(f"{adapter}: the adapter does not fit the base model ({type(exc).__name__}: {exc})") from exc


def _saved_tokenizer(cfg, directory: Path):
    """The tokenizer saved in `directory` (stage 03 saves the one training used beside the adapter), else the base's."""
    from transformers import AutoTokenizer

    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=cfg.trust_remote_code)
    else:
        tokenizer = models.load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def merge(cfg, run_dir: str | Path) -> Path:
    """Merge run_dir/adapter into a full-precision base; save it with tokenizer, chat template and generation config."""
    adapter = adapter_dir(run_dir)
    _check_adapter_base(cfg, adapter_summary(run_dir)["base_model"])
    model = _with_adapter(_load_full_precision(cfg, export_dtype(cfg)), adapter)
    try:
        merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of writing them
    except ValueError as exc:
        raise MedcotError(f"{adapter}: merging failed ({exc})") from exc
    _retie_if_equal(merged)
    target = merged_dir(run_dir)
    check_disk(target.parent, sum(p.numel() * p.element_size() for p in merged.parameters()), "merged checkpoint")
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp)  # also writes generation_config.json
        _saved_tokenizer(cfg, adapter).save_pretrained(tmp)  # tokenizer files and chat_template.jinja
    return target


def _prompts(records: list[Record], tokenizer, style: prompts.PromptStyle) -> list[tuple[str, list[int]]]:
    """Each record's inference prompt and its token ids, exactly as generation renders them."""
    rendered = [prompts.render(r, tokenizer, style, with_target=False) for r in records]
    return [(x.prompt, tokenizer(x.prompt, add_special_tokens=x.add_special_tokens)["input_ids"]) for x in rendered]


def check_merge(cfg, run_dir: str | Path, records: list[Record] | None = None) -> dict:
    """Logits of base + adapter (unmerged) and of the saved merged checkpoint, both run in fp32, on a few prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    records = SHOWCASE[:3] if records is None else records
    adapter, saved = adapter_dir(run_dir), merged_dir(run_dir)
    if not (saved / "config.json").is_file():
        raise MedcotError(f"{saved}: no merged checkpoint; call export.merge first")
    tokenizer = _saved_tokenizer(cfg, adapter)
    batch = [ids for _, ids in _prompts(records, tokenizer, prompts.PromptStyle.from_recipe(cfg))]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def logits(model) -> list:
        model.to(device).eval()
        with torch.no_grad():
            return [model(torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in batch]

    # The reference is untied too: with an lm_head adapter that is the same function, without PEFT's tie warning.
    reference = logits(_with_adapter(_load_full_precision(cfg, torch.float32), adapter))
    merged_model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    tied = bool(merged_model.config.tie_word_embeddings)
    result = logits(merged_model)
    diffs = [(a - b).abs() for a, b in zip(reference, result, strict=True)]
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, result, strict=True))
    tokens = sum(len(ids) for ids in batch)
    dtype = _dtype_name(export_dtype(cfg))
    worst = max(float(d.max()) for d in diffs)
    return {"export_dtype": dtype, "tolerance": MERGE_TOLERANCE[dtype], "max_abs_diff": worst,
            "mean_abs_diff": sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs),
            "top1_agreement": agree / tokens, "prompts": len(batch), "positions": tokens,
            "tied_embeddings": tied, "ok": worst <= MERGE_TOLERANCE[dtype]}


def ensure_merge_ok(check: dict) -> None:
    """Fail the stage when the saved merged model does not reproduce base + adapter."""
    if not check["ok"]:
        raise MedcotError(f"the merged checkpoint's logits differ from base + adapter by up to {check['max_abs_diff']:.4g} "
                          f"(tolerance for {check['export_dtype']}: {check['tolerance']}); the merge is wrong (tied "
                          f"embeddings merged twice, or an adapter layer PEFT cannot merge exactly)")
