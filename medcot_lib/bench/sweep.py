"""`medcot bench sweep`: the demo's training settings, each trained once: time, val loss, val format compliance."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .. import data, prompts, recipe, train
from .generate import _quiet_llama
from .measure import PeakMemory, Stopwatch, guarded, release_freed_memory
from .settings import PARAMS, Sizes, _recipe

# Each point sets the training knobs a teacher would ask about, on top of the demo recipe; the table marks the point
# that the recipe ships with. Learning rate, number of steps and the schedule's shape decide how often and how hard the
# model is pushed towards the format within the demo's time budget.
SWEEP_KNOBS = ("learning_rate", "max_steps", "lr_scheduler_type", "layers_to_transform")
UPPER_HALF = list(range(15, 30))  # SmolLM2-135M has 30 decoder layers
SWEEP_POINTS = (
    {"learning_rate": 2.0e-3, "max_steps": 32, "lr_scheduler_type": "cosine", "layers_to_transform": UPPER_HALF},
    {"learning_rate": 2.0e-3, "max_steps": 48, "lr_scheduler_type": "cosine", "layers_to_transform": UPPER_HALF},
    {"learning_rate": 2.0e-3, "max_steps": 40, "lr_scheduler_type": "constant_with_warmup", "layers_to_transform": UPPER_HALF},
    {"learning_rate": 1.0e-3, "max_steps": 48, "lr_scheduler_type": "cosine", "layers_to_transform": UPPER_HALF},
)


def _point_name(point: dict) -> str:
    shown = {k: ("all" if v is None else f"{v[0]}-{v[-1]}" if isinstance(v, list) else v) for k, v in point.items()}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def _evals_at(max_steps: int) -> dict:
    """Evaluate (and checkpoint) at the start, half way and at the end, whatever the number of steps."""
    return {"eval_steps": max_steps // 2, "save_steps": max_steps // 2}


def _sweep_point(cfg, splits: dict, work_dir: Path) -> dict:
    """Train one setting with the real stage-03 trainer, then score format compliance on the val split (greedy,
    llama.cpp on the merged model): validation items only, never an eval set."""
    from .. import export, generate
    from ..answers import well_formed

    model, tokenizer = train.load_for_training(cfg)
    trainer = train.build_trainer(cfg, model, tokenizer, splits, str(work_dir / "checkpoints"))
    with PeakMemory() as memory, Stopwatch() as clock:
        trained = train.run(trainer, cfg, work_dir)
    del model, trainer
    release_freed_memory()
    with _quiet_llama():
        merged = export.to_gguf(export.merge(cfg, work_dir), work_dir / "merged-f16.gguf", "f16")
        outputs = generate.generate_gguf(merged, tokenizer, splits["val"], prompts.PromptStyle.from_recipe(cfg),
                                         generate.Decoding.from_recipe(cfg), progress=False)
    compliant = [well_formed(g.output) for g in outputs]
    return {"train_s": clock.seconds, "eval_loss_first": trained["eval_loss_first"], "eval_loss_last": trained["eval_loss_last"],
            "val_format_compliance": sum(compliant) / len(compliant), "val_n": len(compliant),
            "trainable_parameters": trained["parameters"]["trainable"], **memory.figures()}


def bench_sweep(sizes: Sizes, repeats: int) -> dict:
    """Training settings of the demo, each trained once on the demo's prepared data: time, val loss, val format compliance."""
    base = _recipe()
    prepared = data.prepare(base)
    points = SWEEP_POINTS[: sizes.sweep_points]
    sides = {}
    with tempfile.TemporaryDirectory(prefix="medcot-bench-sweep-") as tmp:
        for number, overrides in enumerate(points):
            settings = {**overrides, **_evals_at(overrides["max_steps"]), **sizes.sweep_overrides}
            cfg = recipe.validate({**base.model_dump(), **settings}, origin=f"sweep point {number}")
            work_dir = Path(tmp) / f"point{number}"
            sides[_point_name(overrides)] = [guarded(lambda cfg=cfg, work_dir=work_dir: _sweep_point(cfg, prepared.splits, work_dir))()]
    return {"settings": {"recipe": PARAMS, "data": {k: len(v) for k, v in prepared.splits.items()},
                         "points": [_point_name(p) for p in points], "repeats": "1 per point (seeded; train_s varies ~10% run to run)",
                         "compliance": "a closed <think> block then a non-empty answer, greedy, on the val split"},
            "sides": sides, "targets": []}
