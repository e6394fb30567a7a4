"""`medcot bench train`: the default recipe against the seeds' padded style, and QLoRA against LoRA."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

from .. import models, prompts, train
from ..data import Record
from .lengths import (
    PADDING_SAMPLE,
    REAL_MAX,
    REAL_MEDIAN,
    REAL_P5,
    REAL_P95,
    length_matched,
    padding_share,
    real_lengths,
)
from .settings import PADDING_PERCENT, PARAMS, QUICK, TRAIN_SPEEDUP, Sizes, _device, _recipe
from .stats import alternate, describe, ratio, summarize, target
from .trainside import TrainSide, fitting, profile_step, timed_side, train_side, with_batches

# Batch 8 x 1,024 in fp32 on a 24 GB machine: without gradient checkpointing the default peaked at 17.7 GB and the
# seed style was killed for memory, so both sides are measured with it (on a GPU, fitting() decides as everywhere).
TRAIN_CHECKPOINTING = not torch.cuda.is_available()
SEED_STYLE = {"packing": False, "completion_only_loss": False}  # each batch padded to its longest sequence, loss on all tokens


def bench_train(sizes: Sizes, repeats: int) -> dict:
    """Default recipe (packing, completion-only loss) vs the seeds' style (padded batches, loss on all tokens); QLoRA vs LoRA."""
    cfg = _recipe(max_length=sizes.train_max_length, activation_checkpointing=TRAIN_CHECKPOINTING)
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    style = prompts.PromptStyle.from_recipe(cfg)
    records = length_matched(sizes.train_batch * sizes.train_batches, tokenizer, style, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="medcot-bench-train-") as tmp:
        default = train_side(cfg, records, tokenizer, sizes.train_batch, Path(tmp) / "default")
        seed = train_side(cfg.model_copy(update=SEED_STYLE), records, tokenizer, sizes.train_batch, Path(tmp) / "seed")
        sides, memory = fitting([default.model, seed.model], lambda: {"default": timed_side(default), "seed-style": timed_side(seed)},
                                cfg.activation_checkpointing)
        runs = alternate(sides, repeats, warmup=False)  # fitting() ran the warm-up
        speed = ratio([r.get("tokens_per_s") for r in runs["default"]], [r.get("tokens_per_s") for r in runs["seed-style"]])
        waste = {"default": 100 * (1 - default.real_tokens / default.computed_tokens),
                 "seed-style": 100 * (1 - seed.real_tokens / seed.computed_tokens)}
        sample = [min(length, sizes.train_max_length) for length in real_lengths(PADDING_SAMPLE)]
        random.Random(cfg.seed).shuffle(sample)
        body = {
            "settings": {"recipe": PARAMS, "batch_size": sizes.train_batch, "max_length": sizes.train_max_length,
                         "batches_per_run": sizes.train_batches, "device": _device(),
                         "dtype": str(next(default.model.parameters()).dtype), "parameters": train.trainable_parameters(default.model)["total"],
                         "real_tokens_per_run": default.real_tokens, "memory": memory,
                         "trainer": f"{type(default.trainer).__name__} from train.build_trainer, stepped by hand: "
                                    "training_step (loss, backward), optimizer step",
                         "data": {"how": "bundled medical-o1, the i-th shortest of n target lengths (evenly spaced quantiles of a "
                                         "lognormal through the real median 670, p5 481, p95 933; max 1074) taking the bundled "
                                         "record of the same rank, its reasoning cut to fit; seeded random batches",
                                  "achieved_tokens": describe(prompts.token_lengths(records, tokenizer, style)),
                                  "real_tokens": {"median": REAL_MEDIAN, "p5": REAL_P5, "p95": REAL_P95, "max": REAL_MAX}},
                         "sides": {"default": "the recipe: PackingCollator (one padding-free row per batch, per-sample "
                                              "attention), completion-only labels",
                                   "seed-style": f"the recipe with {SEED_STYLE}: PaddingCollator (each batch padded to its "
                                                 "longest sequence), labels on all tokens"}},
            "padding_percent": {**waste, f"seed-style, expected over {PADDING_SAMPLE} sequences":
                                100 * padding_share(sample, sizes.train_batch)},
            "sides": runs, "ratios": {"tokens_per_s default / seed-style": speed},
            "targets": [target("train: non-pad tokens/s, default / seed-style", speed, ">=", TRAIN_SPEEDUP, "x"),
                        target("train: padding share of computed tokens (default)", waste["default"], "<=", PADDING_PERCENT, "%")],
        }
        if not all(t["met"] for t in body["targets"]) or sizes is QUICK:
            body["profile"] = {"default": profile_step(default), "seed-style": profile_step(seed)}
        qcfg = cfg.model_copy(update={"activation_checkpointing": memory["gradient_checkpointing"]})
        body["qlora"] = _qlora_vs_lora(qcfg, default, records[: sizes.qlora_batch], repeats, Path(tmp))
    return body


def _qlora_vs_lora(cfg, lora: TrainSide, records: list[Record], repeats: int, work_dir: Path) -> dict:
    """Model memory footprint and step time of a 4-bit (QLoRA) base against the 16/32-bit (LoRA) one, same batches."""
    tokenizer = lora.trainer.processing_class
    qcfg = cfg.model_copy(update={"load_in_4bit": True})
    qlora = train_side(qcfg, records, tokenizer, len(records), work_dir / "qlora")
    lora = with_batches(lora, qlora.trainer.train_dataset.to_list(), len(records))
    sides, memory = fitting([lora.model, qlora.model], lambda: {"lora": timed_side(lora), "qlora": timed_side(qlora)},
                            cfg.activation_checkpointing)
    runs = alternate(sides, repeats, warmup=False)
    footprint = {"lora": lora.model.get_memory_footprint() / 2**30, "qlora": qlora.model.get_memory_footprint() / 2**30}
    return {"lora_dtype": str(next(lora.model.parameters()).dtype), "qlora": f"{qcfg.bnb_4bit_quant_type}, double quantization "
            f"{qcfg.bnb_4bit_use_double_quant}", "memory": memory, "model_footprint_gb": footprint, "sides": runs,
            "summary": {side: summarize(side_runs) for side, side_runs in runs.items()},
            "ratios": {"step_s qlora / lora": ratio([r.get("step_s") for r in runs["qlora"]], [r.get("step_s") for r in runs["lora"]]),
                       "footprint qlora / lora": footprint["qlora"] / footprint["lora"]}}
