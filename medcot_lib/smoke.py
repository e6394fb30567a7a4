"""Smoke mode: a recipe's own code path at CPU scale (embedded model, bundled data, a few steps).

It sits above the recipe schema and the data readers: choosing a source's bundled stand-in may
need to read the source's first item to learn its schema.
"""

from __future__ import annotations

from typing import Any

from .data import detect_format, read_items, reference_file
from .errors import MedcotError
from .recipe import (
    DEFAULT_MODEL,
    DISTILLED,
    RANDOM_PREFIX,
    DatasetSource,
    Recipe,
    cuda_only_settings,
    validate,
)

# The bundled sample of each schema stands in for the real data in smoke mode.
SMOKE_DATA = {"medical_o1": "bundled:medical-o1", "mcq": "bundled:medqa", "pubmedqa": "bundled:pubmedqa",
              "medmcqa": "bundled:medmcqa", "reasonmed": "bundled:reasonmed", "messages": "bundled:messages",
              "sharegpt": "bundled:sharegpt"}
SMOKE_STEPS = 3  # optimizer steps: enough to take a real step, evaluate and checkpoint
SMOKE_MAX_LENGTH = 1024  # the bundled items are at most about 1,100 tokens
SMOKE_BATCH = 2  # sequences per forward pass on a laptop CPU
SMOKE_ACCUMULATION = 2  # forward passes per step: still exercises accumulation, 2 x 2 x 3 = 12 sequences in all
SMOKE_SPLIT_COUNT = 8  # split counts (e.g. the seeds' 1000-item test sets) shrink to this
SMOKE_NEW_TOKENS = 32
SMOKE_DISTILL_QUESTIONS = 4  # per distill source
SMOKE_DISTILL_ATTEMPTS = 2
SMOKE_DISTILL_NEW_TOKENS = 64


def _smoke_source(source: DatasetSource, cap: int | None = None) -> DatasetSource:
    if source.path == DISTILLED:
        return source
    fmt = source.format
    if fmt == "auto":
        path = reference_file(source.path)
        if path is None:
            raise MedcotError(f"smoke mode: set `format:` on hub source {source.path} so its bundled stand-in can be chosen")
        line, key, item = next(iter(read_items(path)))
        fmt = detect_format(item, keyed=key is not None)
    stand_in = SMOKE_DATA[fmt]
    truth = "bundled:pubmedqa-ground-truth" if source.ground_truth else None
    update = {"path": stand_in, "config": None, "ground_truth": truth, "name": source.label}
    if cap is not None:
        update["max_samples"] = min(source.max_samples or cap, cap)
    return source.model_copy(update=update)


def _smoke_distillation(cfg: Recipe) -> dict[str, Any]:
    """The embedded model as a llama.cpp teacher on a handful of questions, with short, few attempts."""
    changes = {"teacher_model": DEFAULT_MODEL, "teacher_backend": "llamacpp", "teacher_load_in_4bit": False,
               "distill_sources": [_smoke_source(s, SMOKE_DISTILL_QUESTIONS) for s in cfg.distill_sources],
               "distill_attempts": min(cfg.distill_attempts, SMOKE_DISTILL_ATTEMPTS),
               "distill_max_new_tokens": min(cfg.distill_max_new_tokens, SMOKE_DISTILL_NEW_TOKENS)}
    if all(s.path == DISTILLED for s in cfg.dataset_mixture):
        # The tiny teacher's answers are rarely right, so a distilled-only mixture could leave stage 03 nothing to
        # train on: the distill sources' own (answer-only, hence no reasoning-length filter) items are trained on too.
        changes["dataset_mixture"] = [*cfg.dataset_mixture, *(_smoke_source(s) for s in cfg.distill_sources)]
        changes["min_cot_chars"] = 0
    return changes


def _smoke_model(reference: str) -> str:
    """The embedded model; a random-weight shape keeps its architecture at its tiny size."""
    if reference.startswith(RANDOM_PREFIX):
        return reference if reference.endswith(":tiny") else f"{reference}:tiny"
    return DEFAULT_MODEL


def smoke(cfg: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe's own code path at CPU scale: embedded model, bundled data, a few steps.

    Method, adapter targets, DoRA, prompt style, loss masking, packing, schedule and split logic
    are kept. Every substitution is returned as one line for the log.
    """
    changes: dict[str, Any] = {"run_name": f"{cfg.run_name}-smoke", "model_name_or_path": _smoke_model(cfg.model_name_or_path),
                               "dataset_mixture": [_smoke_source(s) for s in cfg.dataset_mixture],
                               "eval_datasets": [_smoke_source(s) for s in cfg.eval_datasets],
                               "max_steps": SMOKE_STEPS, "eval_steps": SMOKE_STEPS, "save_steps": SMOKE_STEPS,
                               "max_length": min(cfg.max_length, SMOKE_MAX_LENGTH),
                               "per_device_train_batch_size": min(cfg.per_device_train_batch_size, SMOKE_BATCH),
                               "per_device_eval_batch_size": min(cfg.per_device_eval_batch_size, SMOKE_BATCH),
                               "gradient_accumulation_steps": min(cfg.gradient_accumulation_steps, SMOKE_ACCUMULATION),
                               "max_new_tokens": min(cfg.max_new_tokens, SMOKE_NEW_TOKENS),
                               "trust_remote_code": False}
    if changes["gradient_accumulation_steps"] % cfg.num_processes:  # each process must accumulate a whole share
        changes["gradient_accumulation_steps"] = cfg.num_processes
    for key in ("val_size", "test_size"):
        if getattr(cfg, key) >= 1:
            changes[key] = min(getattr(cfg, key), SMOKE_SPLIT_COUNT)
    changes.update(cuda_only_settings(cfg))
    if cfg.distillation:
        changes.update(_smoke_distillation(cfg))
    if cfg.push_to_hub:  # a smoke model never goes to the recipe's hub repository
        changes["push_to_hub"] = False
    # 16-bit weights load and run on a CPU, but most CPUs compute them far slower than fp32.
    for key in ("dtype", "bnb_4bit_compute_dtype", "export_dtype"):
        if getattr(cfg, key) in ("bfloat16", "float16"):
            changes[key] = "float32"
    log = [f"smoke: {key} {_short(getattr(cfg, key))} -> {_short(value)}" for key, value in changes.items()
           if _short(getattr(cfg, key)) != _short(value)]
    smoked = validate(cfg.model_copy(update=changes).model_dump(), origin=f"{cfg.run_name} (smoke mode)")
    return smoked, log


def _short(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], DatasetSource):
        return "[" + ", ".join(s.path for s in value) + "]"
    return repr(value)
