"""`medcot bench gpu`: each seed recipe at its real settings on a random-weight model of its real shape.

For every seed recipe (params/*.yaml but the CPU demo) the model becomes `random:<its shape>` (random_models.py):
the full shape on a CUDA GPU, the tiny shape on a CPU (or with --quick), so the same code runs in CI and cannot rot.
Everything else is the recipe's own: batch, max_length, precision, optimizer, 4-bit settings, DoRA, activation
checkpointing, packing, backend. The trainer is the one stage 03 builds (train.build_trainer), stepped by hand
on one micro-batch of the recipe's size, repeated: a warm-up step, then `repeats` timed steps. Reported per recipe:
peak memory (the CUDA allocator's peak on a GPU, RSS on a CPU), tokens/s, MFU, step time, and the loss of each step,
which must fall on a repeated batch. Then greedy generation with HF's generate, and with vLLM where it is installed.

What cannot run on the machine is mapped and said in the result's `mapped` list: CUDA-only settings on a CPU,
flash_attention_2 without flash-attn (sdpa, per-sample packed attention), the Unsloth backend without unsloth or CUDA.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import generate, prompts, random_models, recipe, train
from ..errors import MedcotError
from ..recipe import cuda_only_settings
from .environment import gpu, mfu
from .lengths import length_matched
from .measure import PeakMemory, Stopwatch, guarded, memory_limit
from .settings import QUICK, Sizes
from .stats import target
from .trainside import TrainSide, train_side

# Smallest first, so a time budget (MEDCOT_BENCH_GPU_BUDGET_S) cuts the largest models, not the quickest.
GPU_RECIPES = ("llama32-1b-qlora", "llama32-1b-reasonmed-lora", "qwen3-8b-qlora", "llama31-8b-hematology-dora",
               "deepseek-r1-distill-llama-8b-unsloth")
GEN_PROMPTS, GEN_NEW_TOKENS = 8, 64  # greedy; random weights rarely emit end-of-turn, so each row runs all 64 tokens
QUICK_BATCH, QUICK_LENGTH = 2, 256  # long enough that every item keeps completion tokens past its prompt
# Anchors published by the seed systems and others, for reading our figures beside (not measured here).
ANCHORS = [
    "seed S0 (Qwen3-8B QLoRA): 99 steps in 37 min on one A100 at 18.5 GB",
    "torchtune: Llama-3-8B QLoRA at 2,413 tokens/s in 7.4 GiB on an RTX 4090",
    "Unsloth: claims 2x faster training with 70% less VRAM than HF + Flash Attention 2",
]


def shaped_recipe(path: Path, tiny: bool) -> tuple[recipe.Recipe, list[str]]:
    """The seed recipe on its random-weight shape, with what this machine cannot run mapped (and said)."""
    cfg = recipe.load(path)
    shape = random_models.shape_for(cfg.model_name_or_path)
    # A benchmark logs nowhere: no TensorBoard files, and no W&B run (nor its package and key) for timing steps.
    changes = {"model_name_or_path": f"{recipe.RANDOM_PREFIX}{shape}{':tiny' if tiny else ''}", "report_to": []}
    if not torch.cuda.is_available():
        changes.update(cuda_only_settings(cfg))
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        changes["attn_implementation"] = "sdpa"
    if cfg.backend == "unsloth" and not (torch.cuda.is_available() and importlib.util.find_spec("unsloth")):
        changes["backend"] = "hf"
    mapped = [f"{key}: {getattr(cfg, key)!r} -> {value!r}" for key, value in changes.items()]
    return cfg.model_copy(update=changes), mapped


def _steps(side: TrainSide, steps: int) -> list[dict]:
    """A warm-up step, then `steps` timed optimizer steps on the same micro-batch; the warm-up's loss is kept."""
    trainer, batch, tokens = side.trainer, side.batches[0], side.real_tokens  # one batch: the recipe's micro-batch
    parameters = train.trainable_parameters(side.model)["total"]
    runs = []
    for index in range(steps + 1):
        with PeakMemory() as memory, Stopwatch() as clock:
            loss = trainer.training_step(trainer.model, dict(batch))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        tokens_per_s = tokens / clock.seconds
        run = {"loss": float(loss), "step_s": clock.seconds, "tokens_per_s": tokens_per_s,
               **memory.figures(), "mfu": mfu(parameters, tokens_per_s)}
        runs.append(run | {"warm_up": True} if index == 0 else run)
    return runs


def _generation(cfg, side: TrainSide, tokenizer, records, new_tokens: int) -> dict:
    """Greedy generation tokens/s of the adapted model with HF generate (and vLLM where installed, on CUDA)."""
    style = prompts.PromptStyle.from_recipe(cfg)
    decoding = generate.Decoding(new_tokens, False, cfg.temperature, cfg.top_p, len(records), cfg.seed)
    with Stopwatch() as clock:
        outputs = generate.generate(side.model, tokenizer, records, style, decoding, progress=False)
    result = {"hf": {"prompts": len(records), "new_tokens": sum(g.new_tokens for g in outputs), "seconds": clock.seconds,
                     "tokens_per_s": sum(g.new_tokens for g in outputs) / clock.seconds}}
    if torch.cuda.is_available() and importlib.util.find_spec("vllm"):
        result["vllm"] = guarded(lambda: _vllm(cfg, side, tokenizer, records, style, decoding))()
    else:
        result["vllm"] = {"skipped": "vllm is not installed" if torch.cuda.is_available() else "vLLM needs a CUDA GPU"}
    return result


def _vllm(cfg, side: TrainSide, tokenizer, records, style, decoding) -> dict:
    with tempfile.TemporaryDirectory(prefix="medcot-bench-gpu-adapter-") as adapter:
        side.model.save_pretrained(adapter)
        with Stopwatch() as clock:
            outputs = generate.generate_vllm(cfg, Path(adapter), tokenizer, records, style, decoding)["fine-tuned"]
    new = sum(g.new_tokens for g in outputs)
    return {"prompts": len(records), "new_tokens": new, "seconds": clock.seconds, "tokens_per_s": new / clock.seconds,
            "note": "includes vLLM's engine start-up, which serves base and adapter"}


def bench_recipe(path: Path, sizes: Sizes, steps: int, work_dir: Path) -> tuple[list[dict], dict]:
    """(per-step runs, details) of one seed recipe on its random-weight shape."""
    tiny = sizes is QUICK or not torch.cuda.is_available()
    cfg, mapped = shaped_recipe(path, tiny)
    if sizes is QUICK:
        cfg = cfg.model_copy(update={"per_device_train_batch_size": min(cfg.per_device_train_batch_size, QUICK_BATCH),
                                     "max_length": min(cfg.max_length, QUICK_LENGTH)})
    built_here = not random_models.checkpoint_dir(cfg.model_name_or_path).is_dir()
    tokenizer = random_models.tokenizer(random_models.parse(cfg.model_name_or_path)[0])
    style = prompts.PromptStyle.from_recipe(cfg)
    records = length_matched(cfg.per_device_train_batch_size, tokenizer, style, cfg.seed)
    with Stopwatch() as load:
        side = train_side(cfg, records, tokenizer, cfg.per_device_train_batch_size, work_dir)
    try:
        runs = _steps(side, steps)
        gen_records = length_matched(QUICK_BATCH if sizes is QUICK else GEN_PROMPTS, tokenizer, style, cfg.seed)
        generation = _generation(cfg, side, tokenizer, gen_records, 4 if sizes is QUICK else GEN_NEW_TOKENS)
        losses = [r["loss"] for r in runs]
        if not any(losses):  # completion-only loss over no completion tokens: the batch was cut inside its prompts
            raise MedcotError(f"{path.name}: every loss is 0 at max_length {cfg.max_length}: no completion token is left")
        details = {
            "model": cfg.model_name_or_path, "label": random_models.label(cfg.model_name_or_path),
            "backend": train.resolve_backend(cfg), "mapped": mapped, "load_s": load.seconds,
            "parameters": train.trainable_parameters(side.model),
            "settings": {k: getattr(cfg, k) for k in ("per_device_train_batch_size", "max_length", "dtype", "bf16", "fp16",
                                                      "tf32", "optim", "load_in_4bit", "bnb_4bit_quant_type",
                                                      "bnb_4bit_use_double_quant", "use_dora", "lora_r",
                                                      "lora_target_modules", "activation_checkpointing", "packing",
                                                      "attn_implementation")},
            "tokens_per_step": side.real_tokens, "losses": losses,
            "loss_falls": losses[-1] < losses[0], "generation": generation,
        }
        return [r for r in runs if not r.get("warm_up")], details
    finally:
        del side
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if built_here and not tiny:  # a full shape's checkpoint is 2.5-16 GB: five of them would fill a machine's disk
            shutil.rmtree(random_models.checkpoint_dir(cfg.model_name_or_path), ignore_errors=True)


def progress_line(name: str, runs: list[dict], details: dict, elapsed_s: float) -> str:
    """One line per recipe as it finishes, so a run cut short (a lent machine's time limit) still leaves its figures."""
    if not runs:
        return f"[bench gpu] {elapsed_s:5.0f} s  {name}: {details.get('error') or details.get('skipped')}"
    median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    mfu_text = f", MFU {median['mfu']:.1%}" if median.get("mfu") is not None else ""
    return (f"[bench gpu] {elapsed_s:5.0f} s  {name}: load {details['load_s']:.0f} s, {median['tokens_per_s']:,.0f} tokens/s"
            f"{mfu_text}, peak {median['peak_memory_gb']:.1f} GB, losses {' '.join(f'{x:.3f}' for x in details['losses'])}, "
            f"HF generation {details['generation']['hf']['tokens_per_s']:.0f} tokens/s")


def bench_gpu(sizes: Sizes, repeats: int) -> dict:
    """Every seed recipe, smallest first, within MEDCOT_BENCH_GPU_BUDGET_S seconds when that is set."""
    from .. import pipeline

    budget = float(os.environ.get("MEDCOT_BENCH_GPU_BUDGET_S", "inf"))
    started, sides, recipes = time.monotonic(), {}, {}
    with tempfile.TemporaryDirectory(prefix="medcot-bench-gpu-") as tmp:
        for name in GPU_RECIPES:
            if time.monotonic() - started > budget:
                recipes[name] = {"skipped": f"time budget of {budget:.0f} s (MEDCOT_BENCH_GPU_BUDGET_S) spent"}
                continue
            path = pipeline.repo_root() / "params" / f"{name}.yaml"
            try:  # one recipe's failure (out of memory, a missing kernel) is recorded; the others still run
                with memory_limit():
                    sides[name], recipes[name] = bench_recipe(path, sizes, repeats, Path(tmp) / name)
            except Exception as exc:
                sides[name], recipes[name] = [], {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            print(progress_line(name, sides[name], recipes[name], time.monotonic() - started), flush=True)
    targets = [target(f"{name}: loss falls on a repeated batch (1 = yes)", int(details["loss_falls"]), ">=", 1)
               for name, details in recipes.items() if "loss_falls" in details]
    return {"settings": {"device": gpu().get("name") or "cpu", "shape": "tiny" if sizes is QUICK or not torch.cuda.is_available() else "full",
                         "timed_steps": repeats, "generation": {"prompts": GEN_PROMPTS, "new_tokens": GEN_NEW_TOKENS},
                         "mfu": "6 x all weights x tokens/s over the GPU's dense bf16 data-sheet peak (the full fine-tuning "
                                "convention; LoRA skips the frozen weights' gradients, so its useful work is nearer 4 x "
                                "weights: multiply by 2/3), attention FLOPs not counted",
                         "anchors_not_measured_here": ANCHORS},
            "recipes": recipes, "sides": sides, "targets": targets}
