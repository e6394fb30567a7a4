"""Training (stage 03): LoRA, QLoRA and DoRA adapters with TRL's SFTTrainer.

Sequences are built by `prompts.encode`, so the training text is exactly the inference prompt
followed by the target. The loss covers the target only (reasoning, answer, end of turn) unless
`completion_only_loss` is off.

Packing is padding-free: a batch is one row holding its samples back to back, with positions
restarting at each sample, and attention that stays inside each sample (per-sample sdpa on the hf
backend, else a block-diagonal causal mask). Positions alone do not isolate samples with sdpa or
eager attention (a later sample attends to earlier ones).

On the hf backend the loss runs the 49k-wide output layer only where a label exists, in tiles
(`labelled_loss`): prompt and padding positions cost nothing there, and the logits never exist
for the whole batch at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import prompts
from .data import Record
from .distributed import world_size

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips


@dataclass
class Tokenized:
    rows: list[dict[str, list[int]]]
    truncated: int  # sequences cut at max_length (their end of turn is lost: reported, not hidden)


def tokenize(records: list[Record], tokenizer, style: prompts.PromptStyle, max_length: int, completion_only: bool) -> Tokenized:
    """input_ids and labels for each record; labels are IGNORE_INDEX on the prompt when completion_only."""
    rows, truncated = [], 0
    for record in records:
        encoded = prompts.encode(prompts.render(record, tokenizer, style), tokenizer)
        ids, mask = encoded["input_ids"], encoded["completion_mask"]
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        labels = [t if (m or not completion_only) else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        rows.append({"input_ids": ids, "labels": labels})
    return Tokenized(rows, truncated)


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """A (1, 1, N, N) boolean mask: causal within each sample, nothing across samples."""
    total = sum(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    return (causal & (segment[:, None] == segment[None, :]))[None, None]


PACKED_ATTENTION = "medcot_packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs):
    """sdpa on each packed sample on its own (causal within it), so no work is spent across samples.

    A block-diagonal mask over the whole row would be exact too, but sdpa then computes every
    N x N score of the row and masks most of them away: with 8 samples that is ~8x the attention work,
    and no fused causal kernel. Without `cu_seq_lens_q` (ordinary batches, generation) this is sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    bounds = bounds.tolist()
    pieces = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout, is_causal=True,
        scale=scaling, enable_gqa=key.shape[1] != query.shape[1]) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def use_packed_attention(model) -> bool:
    """Switch an sdpa model to per-sample packed attention; False (nothing changed) for other implementations."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # masks for ordinary batches are sdpa's
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


class PackingCollator:
    """Concatenate a batch's samples into one row: no padding, and no attention across samples.

    With `boundaries` the samples' start offsets travel as `cu_seq_lens_*`, which only an attention
    that reads them isolates (`use_packed_attention`); plain sdpa would let samples attend to each
    other, so the default is the block-diagonal causal mask, exact with any attention.
    """

    def __init__(self, boundaries: bool = False):
        self.boundaries = boundaries

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        input_ids = torch.tensor([t for f in features for t in f["input_ids"]])[None]
        labels = torch.tensor([t for f in features for t in f["labels"]])[None]
        # The first token of each sample has no predecessor in it: never predict it from the previous sample.
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        labels[0, starts] = IGNORE_INDEX
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if not self.boundaries:
            return {**batch, "attention_mask": block_causal_mask(lengths)}
        offsets = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return {**batch, "cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": max(lengths),
                "max_length_k": max(lengths)}


class PaddingCollator:
    """Right-pad each batch to its longest sample (the seeds' style)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)

        def pad(values, fill):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values])

        return {"input_ids": pad([f["input_ids"] for f in features], self.pad_token_id),
                "labels": pad([f["labels"] for f in features], IGNORE_INDEX),
                "attention_mask": pad([[1] * len(f["input_ids"]) for f in features], 0)}


# Positions per output-layer tile: 1,024 x 49,152 vocabulary x 4 bytes = 200 MB of fp32 logits alive at a time
# (a Qwen3 vocabulary of 151,936 makes it 620 MB). The logits of all 5,400 tokens of a batch of 8 would be 1.1 GB,
# and the softmax, its gradient and TRL's CPU fallback (which scores every position) several times that.
LOSS_TILE = 1024


@dataclass
class LabelledLoss:
    loss: torch.Tensor  # summed cross-entropy / (labelled tokens, or num_items_in_batch across accumulation)
    labelled: int  # positions that have a next-token label
    correct: int  # of those, how many the model ranks first


def _tile_loss(hidden: torch.Tensor, targets: torch.Tensor, lm_head) -> tuple[torch.Tensor, torch.Tensor]:
    logits = lm_head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


def _backbone(model):
    """The decoder under the output layer (PEFT wrapper, then the causal-LM class)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def labelled_loss(model, batch: dict[str, torch.Tensor], num_items_in_batch=None) -> LabelledLoss:
    """Mean next-token cross-entropy, with the output layer run only where a label exists, in LOSS_TILE tiles.

    Equal to the model's own loss (tested), but prompt, padding and sample-start positions never reach
    the 49k-wide output layer, and each tile's logits are recomputed in backward instead of being kept
    (torch.utils.checkpoint; its RNG replay keeps LoRA dropout on an adapted lm_head identical).
    """
    from torch.utils.checkpoint import checkpoint

    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = _backbone(model)(**inputs, use_cache=False).last_hidden_state[:, :-1][mask]
    targets = labels[mask]
    lm_head = model.get_output_embeddings()
    # Starting from 0 x hidden keeps a batch without labelled tokens (all prompt) differentiable: a zero loss, not an error.
    total, correct = hidden.sum().float() * 0.0, 0
    for start in range(0, len(targets), LOSS_TILE):
        tile = (hidden[start:start + LOSS_TILE], targets[start:start + LOSS_TILE], lm_head)
        summed, right = checkpoint(_tile_loss, *tile, use_reentrant=False) if torch.is_grad_enabled() else _tile_loss(*tile)
        total, correct = total + summed, correct + right  # summed on the device: one sync at the end, not one per tile
    denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    return LabelledLoss(total / denominator, int(mask.sum()), int(correct))


def fits_labelled_loss(model) -> bool:
    """labelled_loss reproduces plain logits = lm_head(hidden); models that scale or soft-cap their logits keep their own loss."""
    text = model.config.get_text_config()
    scaled = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    return all(getattr(text, name, None) in (None, 1.0) for name in scaled)


class LabelledLossTrainer:
    """Mixed into Trainer and SFTTrainer (hf backend): the training and eval loss is labelled_loss.

    TRL's fused LM head scores only labelled positions on Triton devices; on a CPU it scores every
    position in one 32k-position tile (batch 8 x 1,024 tokens peaked at 22.6 GB), and transformers'
    Trainer builds the full logits. Token accuracy is logged as SFTTrainer logs it.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Under DDP or FSDP only the wrapper's own forward synchronises gradients across processes, so a wrapped model
        # keeps the trainer's loss (the same value: labelled_loss equals the model's loss, tested).
        wrapped = self.accelerator.unwrap_model(model) is not model
        if return_outputs or wrapped or not fits_labelled_loss(model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        result = labelled_loss(model, inputs, num_items_in_batch)
        loss = result.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # like Trainer: DDP averages the gradients across ranks
        if hasattr(self, "_metrics") and result.labelled:
            self._metrics["train" if model.training else "eval"]["mean_token_accuracy"].append(result.correct / result.labelled)
        return loss


# --------------------------------------------------------------------------- adapters and the trainer


def linear_module_names(model) -> list[str]:
    """Names (last component) of the model's linear layers, which LoRA can target."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.split(".")[-1])
    return sorted(names)


def peft_config(cfg, model):
    """The LoRA/DoRA adapter config, after checking the target module names against the model."""
    from peft import LoraConfig

    from .errors import MedcotError

    targets = cfg.lora_target_modules
    if targets != "all-linear":
        if not targets:
            raise MedcotError("lora_target_modules is empty (expected module names such as q_proj, or all-linear)")
        known = linear_module_names(model)
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise MedcotError(f"lora_target_modules: {unknown} are not linear modules of this model (its linear modules: {', '.join(known)})")
    check_layers(cfg, model)
    if targets == "all-linear" and cfg.layers_to_transform:
        # PEFT takes layers_to_transform only with explicit module names; all-linear means every linear layer but the output.
        targets = [name for name in linear_module_names(model) if name not in output_layer_names(model)]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.lora_bias,
                      target_modules=targets, layers_to_transform=cfg.layers_to_transform, use_rslora=cfg.use_rslora,
                      use_dora=cfg.use_dora, task_type="CAUSAL_LM")


def output_layer_names(model) -> set[str]:
    """Name (last component) of the model's output layer, e.g. {"lm_head"}."""
    output = model.get_output_embeddings()
    return {name.split(".")[-1] for name, module in model.named_modules() if module is output}


def check_layers(cfg, model) -> None:
    """layers_to_transform must name decoder layers the model has."""
    from .errors import MedcotError

    layers = model.config.get_text_config().num_hidden_layers
    outside = [i for i in cfg.layers_to_transform or [] if i >= layers]
    if outside:
        raise MedcotError(f"layers_to_transform: {outside} are not layers of this model (it has {layers}: 0 to {layers - 1})")


def add_adapter(cfg, model):
    """Wrap the base in a fresh adapter (initialised from the recipe's seed); a 4-bit base is first prepared for k-bit training."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.activation_checkpointing)
    set_seed(cfg.seed)  # LoRA's A matrices are random: without this, two runs of one recipe start apart
    return get_peft_model(model, peft_config(cfg, model))


# Unsloth's get_peft_model takes explicit module names; these are PEFT's all-linear for Llama-style models.
LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def resolve_backend(cfg) -> str:
    """hf, or Unsloth when asked for (or, with auto, when a CUDA GPU is present and unsloth imports)."""
    import importlib.util

    from .errors import MedcotError

    on_gpu = torch.cuda.is_available()
    installed = importlib.util.find_spec("unsloth") is not None
    if cfg.backend == "hf" or (cfg.backend == "auto" and not (on_gpu and installed)):
        return "hf"
    if not on_gpu:
        raise MedcotError("backend: unsloth needs a CUDA GPU and none is present; use backend: hf (or auto), or run with --smoke")
    if not installed:
        raise MedcotError("backend: unsloth, but the unsloth package is not installed (pip install -e '.[unsloth]' on the GPU machine)")
    return "unsloth"


def load_for_training(cfg):
    """(model with a fresh adapter, tokenizer) from the recipe's backend; both backends share templates and masking."""
    from . import models

    if resolve_backend(cfg) == "unsloth":
        return _load_unsloth(cfg)
    tokenizer = models.load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    return add_adapter(cfg, models.load_model(cfg)), tokenizer


def _load_unsloth(cfg):
    """Unsloth's documented two calls: FastLanguageModel.from_pretrained, then get_peft_model."""
    from unsloth import FastLanguageModel  # imported first so it can patch transformers

    from .errors import MedcotError
    from .models import hub_token, resolve, resolve_dtype

    if cfg.use_dora:
        raise MedcotError("use_dora is not available on the unsloth backend in medcot; use backend: hf for DoRA")
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=resolve(cfg.model_name_or_path), max_seq_length=cfg.max_length, dtype=resolve_dtype(cfg.dtype),
        load_in_4bit=cfg.load_in_4bit, token=hub_token(), trust_remote_code=cfg.trust_remote_code,
    )
    targets = LLAMA_LINEAR_MODULES if cfg.lora_target_modules == "all-linear" else cfg.lora_target_modules
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora_r, target_modules=targets, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        bias=cfg.lora_bias, use_gradient_checkpointing="unsloth" if cfg.activation_checkpointing else False,
        random_state=cfg.seed, use_rslora=cfg.use_rslora, layers_to_transform=cfg.layers_to_transform,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def trainable_parameters(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": round(100 * trainable / total, 4)}


def _wandb_environment(output_dir: str) -> None:
    """W&B reads WANDB_API_KEY from the environment; without one it logs offline into the run directory."""
    import os

    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", output_dir)


def sft_config(cfg, output_dir: str, has_eval: bool):
    from trl import SFTConfig

    if "wandb" in cfg.report_to:
        _wandb_environment(output_dir)

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=output_dir,
        seed=cfg.seed,
        max_length=cfg.max_length,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        # The recipe's global batch, whatever the process count (recipe.py): N processes accumulate 1/N as many.
        gradient_accumulation_steps=cfg.gradient_accumulation_steps // world_size(),
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        activation_checkpointing=cfg.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.activation_checkpointing else None,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        tf32=cfg.tf32 or None,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        eval_on_start=cfg.eval_on_start and has_eval,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=cfg.load_best_model_at_end and has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        report_to=cfg.report_to,
        use_cpu=not on_gpu,
        # Our datasets are already tokenized with prompts.encode, with labels; TRL must not re-template them.
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )


def adapts_lm_head(model) -> bool:
    """Whether the adapter sits on the output layer.

    TRL 1.16's SFTTrainer computes log-probabilities from `lm_head.weight` directly (its fused LM head) and
    refuses an adapter there, which would never be trained. The seeds that target `lm_head` therefore train
    with transformers' Trainer, which runs the model's own forward; data, labels, collator and arguments
    are the same objects either way.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(model.get_output_embeddings(), BaseTunerLayer)


def build_trainer(cfg, model, tokenizer, splits: dict[str, list[Record]], output_dir: str):
    """An SFTTrainer (Trainer when the adapter covers lm_head) over the prepared splits, with the recipe's loss mask and collator."""
    from datasets import Dataset
    from transformers import Trainer
    from trl import SFTTrainer

    style = prompts.PromptStyle.from_recipe(cfg)
    train_rows = tokenize(splits["train"], tokenizer, style, cfg.max_length, cfg.completion_only_loss)
    eval_rows = tokenize(splits.get("val", []), tokenizer, style, cfg.max_length, cfg.completion_only_loss)
    # Unsloth replaces the attention forward itself, so only the hf backend switches to per-sample packed attention.
    backend = resolve_backend(cfg)
    per_sample = cfg.packing and backend == "hf" and use_packed_attention(model)
    collator = PackingCollator(boundaries=per_sample) if cfg.packing else PaddingCollator(tokenizer.pad_token_id)
    trainer_class = Trainer if adapts_lm_head(model) else SFTTrainer
    if backend == "hf":  # Unsloth brings its own fused loss
        trainer_class = type(f"Medcot{trainer_class.__name__}", (LabelledLossTrainer, trainer_class), {})
    trainer = trainer_class(
        model=model,
        args=sft_config(cfg, output_dir, has_eval=bool(eval_rows.rows)),
        data_collator=collator,
        train_dataset=Dataset.from_list(train_rows.rows),
        eval_dataset=Dataset.from_list(eval_rows.rows) if eval_rows.rows else None,
        processing_class=tokenizer,
    )
    trainer.medcot_truncated = {"train": train_rows.truncated, "val": eval_rows.truncated}
    return trainer


# --------------------------------------------------------------------------- running


def latest_checkpoint(output_dir: str | Path, base_model: str) -> str | None:
    """The newest checkpoint to resume from, after checking it is complete and belongs to this base model."""
    from transformers.trainer_utils import get_last_checkpoint

    from .errors import MedcotError

    if not Path(output_dir).is_dir():
        return None
    checkpoint = get_last_checkpoint(str(output_dir))
    if checkpoint is None:
        return None
    needed = ["trainer_state.json", "adapter_config.json", "adapter_model.safetensors"]
    missing = [name for name in needed if not (Path(checkpoint) / name).is_file()]
    if missing:
        raise MedcotError(f"{checkpoint}: incomplete checkpoint (missing {', '.join(missing)}); delete it to resume from the one before, or rerun with --overwrite")
    saved_base = json.loads((Path(checkpoint) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if saved_base != base_model:
        raise MedcotError(f"{checkpoint}: checkpoint of another base model ({saved_base}, this run uses {base_model}); use another run directory or --overwrite")
    return checkpoint


def _checkpoint_step(checkpoint: str | None) -> int:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"] if checkpoint else 0


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or on CPU the peak resident set size of this process."""
    import resource

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux reports KiB


def run(trainer, cfg, run_dir: str | Path) -> dict:
    """Train (resuming from the latest checkpoint), save the adapter and tokenizer, and return the metrics."""
    import time

    from .errors import MedcotError
    from .models import resolve

    checkpoint = latest_checkpoint(trainer.args.output_dir, resolve(cfg.model_name_or_path))
    started = time.monotonic()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError as exc:
        raise MedcotError("out of memory: lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
                          "effective batch), turn on activation_checkpointing, lower max_length, or set load_in_4bit") from exc
    seconds = time.monotonic() - started
    save_adapter(trainer, Path(run_dir) / "adapter")
    rows = trainer.train_dataset
    tokens_per_sample = sum(len(ids) for ids in rows["input_ids"]) / len(rows)
    start_step = _checkpoint_step(checkpoint)
    samples = (trainer.state.global_step - start_step) * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return {
        "resumed_from": checkpoint,
        "global_step": trainer.state.global_step,
        "steps_this_run": trainer.state.global_step - start_step,
        "runtime_s": round(seconds, 1),
        "train_loss": result.training_loss,
        "eval_loss_first": evals[0] if evals else None,
        "eval_loss_last": evals[-1] if evals else None,
        "best_eval_loss": trainer.state.best_metric,
        # Tokens/s counts every real (non-pad) token the steps consumed, averaged over the training set.
        "tokens_per_s": round(samples * tokens_per_sample / seconds, 1),
        "peak_memory_gb": peak_memory_gb(),  # of this process (rank 0 when several train)
        "processes": trainer.accelerator.num_processes,
        "global_batch": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
        "parameters": trainable_parameters(trainer.model),
        "truncated_sequences": trainer.medcot_truncated,
    }


def save_adapter(trainer, path: Path) -> None:
    """adapter/ (weights, config, tokenizer, trainer state), written once, by the main process, and atomically.

    Every process takes part in save_model, because FSDP and ZeRO-3 gather the sharded adapter for it; only the main
    process writes. The staging name is an atomic write's (.NAME.tmp), so a killed run's is removed on resume.
    """
    import os
    import shutil

    accelerator, staging = trainer.accelerator, path.parent / f".{path.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # adapter and tokenizer (the trainer saves its processing_class)
    if accelerator.is_main_process:
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        (staging / "training_args.bin").unlink(missing_ok=True)  # the arguments are in the manifest, readably
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    accelerator.wait_for_everyone()


def train_in_process(cfg, run_dir: str | Path) -> tuple[dict, list[dict]]:
    """(metrics, log history) of training in this process: the whole stage, or one rank of a launched run."""
    from .data import load_prepared

    model, tokenizer = load_for_training(cfg)
    trainer = build_trainer(cfg, model, tokenizer, load_prepared(Path(run_dir)), str(Path(run_dir) / "checkpoints"))
    return run(trainer, cfg, run_dir), trainer.state.log_history


def train_stage(cfg, run_dir: str | Path) -> tuple[dict, list[dict]]:
    """Stage 03: train here in the notebook's kernel, or on cfg.num_processes processes under accelerate launch."""
    from . import distributed

    if distributed.requested(cfg):
        return distributed.launch(cfg, run_dir)
    return train_in_process(cfg, run_dir)
