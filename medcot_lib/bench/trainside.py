"""Timed training steps: a recipe's real trainer stepped by hand over fixed batches (the train and scaling benchmarks)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from .. import train
from ..data import Record
from .environment import mfu
from .measure import PeakMemory, Stopwatch, _out_of_memory, guarded, memory_limit
from .settings import _device

TOP_OPS = 12  # operators listed per profiled step


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _chunks(rows: list, size: int) -> list[list]:
    return [rows[i: i + size] for i in range(0, len(rows), size)]


@dataclasses.dataclass
class TrainSide:
    """A recipe's real trainer (train.build_trainer) stepped by hand over fixed batches made by its own collator."""

    trainer: object
    batches: list[dict]
    real_tokens: int  # non-pad tokens in the batches
    computed_tokens: int  # positions the model runs, padding included

    @property
    def model(self):
        return self.trainer.model


def train_side(cfg, records: list[Record], tokenizer, batch_size: int, work_dir: Path) -> TrainSide:
    """The recipe's model, adapter, trainer (loss, attention, collator) and optimizer, as stage 03 builds them."""
    model = train.load_for_training(cfg)[0].to(_device())  # the recipe's backend: hf, or Unsloth on a GPU
    set_checkpointing(model, cfg.activation_checkpointing)  # Trainer.train() would do this; we step without it
    model.train()
    trainer = train.build_trainer(cfg, model, tokenizer, {"train": records}, str(work_dir))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which the benchmark replaces
    rows = trainer.train_dataset.to_list()
    batches = [_to(trainer.data_collator(chunk), _device()) for chunk in _chunks(rows, batch_size)]
    return TrainSide(trainer, batches, sum(len(r["input_ids"]) for r in rows), sum(b["input_ids"].numel() for b in batches))


def with_batches(side: TrainSide, rows: list[dict], batch_size: int) -> TrainSide:
    """The same trainer over other batches (the scaling sweep's points)."""
    batches = [_to(side.trainer.data_collator(chunk), _device()) for chunk in _chunks(rows, batch_size)]
    return TrainSide(side.trainer, batches, sum(len(r["input_ids"]) for r in rows), sum(b["input_ids"].numel() for b in batches))


def _step(trainer, batch: dict) -> None:
    """What Trainer does per optimizer step without accumulation: its training_step (loss + backward), then the optimizer."""
    trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def timed_side(side: TrainSide) -> Callable[[], dict]:
    """One timed pass over the side's batches."""

    def run() -> dict:
        try:
            with PeakMemory() as memory, Stopwatch() as clock:
                for batch in side.batches:
                    _step(side.trainer, batch)
        finally:
            side.trainer.optimizer.zero_grad(set_to_none=True)
        tokens_per_s = side.real_tokens / clock.seconds
        return {"seconds": clock.seconds, "step_s": clock.seconds / len(side.batches), "tokens_per_s": tokens_per_s,
                **memory.figures(), "mfu": mfu(train.trainable_parameters(side.model)["total"], tokens_per_s)}

    return guarded(run)


def set_checkpointing(model, on: bool) -> None:
    if on:  # the settings train.sft_config gives the Trainer
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()


def fitting(trained: list, make_sides: Callable[[], dict], checkpointing: bool) -> tuple[dict, dict]:
    """Sides after their warm-up run. If one runs out of memory, gradient checkpointing goes on for every model and
    fresh sides warm up again, so all sides are measured the same way; the JSON says so, and why."""
    sides = make_sides()
    failed = {name: result["error"] for name, side in sides.items() if "error" in (result := side())}
    if not failed or checkpointing:
        return sides, {"gradient_checkpointing": checkpointing, "out_of_memory": failed}
    for model in trained:
        set_checkpointing(model, True)
    sides = make_sides()
    for side in sides.values():
        side()
    return sides, {"gradient_checkpointing": True, "why": f"turned on after running out of memory without it: {failed}"}


def profile_step(side: TrainSide) -> dict:
    """Where one training step's time goes: forward (the trainer's loss) / backward / optimizer, and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    trainer, phases = side.trainer, {}
    try:
        with memory_limit(), profile(activities=activities) as prof:
            with Stopwatch() as clock:
                value = trainer.compute_loss(trainer.model, dict(side.batches[0]))
            phases["forward"] = clock.seconds
            with Stopwatch() as clock:
                value.backward()
            phases["backward"] = clock.seconds
            with Stopwatch() as clock:
                trainer.optimizer.step()
            phases["optimizer"] = clock.seconds
    except (RuntimeError, MemoryError) as exc:
        if not _out_of_memory(exc):
            raise
        return {"error": "out of memory: " + str(exc).splitlines()[0][:200]}
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return {"phases_s": phases, "time": key.replace("_total", ""),
            "top_ops": [{"op": e.key, "self_s": getattr(e, key) / 1e6, "share": getattr(e, key) / total, "calls": e.count}
                        for e in events[:TOP_OPS]]}
