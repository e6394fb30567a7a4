"""What every benchmark shares: the recipe it runs, the targets it is judged by, how much work it does, the device."""

from __future__ import annotations

import dataclasses

import torch

from .. import recipe

PARAMS = "params/cpu-demo.yaml"  # every benchmark runs the CPU demo recipe (embedded model, bundled data)

# Targets (issue 7).
TRAIN_SPEEDUP, PADDING_PERCENT = 1.5, 2.0  # default recipe vs seed style, non-pad tokens/s; % of computed tokens that are pad
GENERATE_SPEEDUP = 8.0  # best engine vs the one-prompt-at-a-time HF loop, generated tokens/s
EXPORT_SECONDS = 60.0  # merge + F16 + Q4_K_M + Q5_K_M + Q8_0 + verification
PIPELINE_SECONDS, PIPELINE_GB = 15 * 60.0, 6.0  # the whole CPU demo, wall time and peak RSS of the process tree
DEMO_FORMAT, DEMO_P = 0.8, 0.01  # (issue 12) the demo's fine-tuned format compliance, and its McNemar p against the base


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does; FULL gives the figures, QUICK only checks the code paths."""

    train_batch: int  # sequences per batch (issue 7: 8)
    train_max_length: int  # tokens (issue 7: 1024)
    train_batches: int  # batches per timed run
    qlora_batch: int  # sequences in the QLoRA-vs-LoRA batch
    gen_prompts: int
    gen_new_tokens: int
    gen_batch_sizes: tuple[int, ...]
    scaling_examples: tuple[int, ...]
    scaling_examples_length: int  # max_length of the examples sweep
    scaling_lengths: tuple[int, ...]
    scaling_length_examples: int  # examples in each point of the length sweep
    export_tokens: int | None  # greedy tokens compared per showcase prompt (None: the recipe's)
    export_held_out: int | None  # held-out records for perplexity (None: the whole test split)
    pipeline_stages: tuple[str, ...] | None  # None: every stage
    sweep_points: int | None  # how many of SWEEP_POINTS (None: all)
    sweep_overrides: dict  # applied to every sweep point (QUICK: a step or two)


FULL = Sizes(
    # Two batches of 8 per timed run (~11k real tokens; one batch is a noisy sample of the padding share):
    # ~85 s packed, ~125-160 s padded on 2 quiet cores, checkpointed.
    train_batch=8, train_max_length=1024, train_batches=2,
    qlora_batch=2,  # the demo recipe's batch: a 4-bit step on a CPU dequantizes every weight, so batch 8 would take minutes
    # MedQA prompts are ~290 tokens here; with 128 new tokens most greedy outputs end earlier (mean ~65).
    gen_prompts=16, gen_new_tokens=128, gen_batch_sizes=(1, 4, 16),
    # Issue 7 suggests 32/64/128 examples; at ~110 training tokens/s on 2 cores that is ~40 min per repetition,
    # so the examples sweep runs at max_length 256 with 8/16/32 examples, and the length sweep with 4 examples.
    scaling_examples=(8, 16, 32), scaling_examples_length=256,
    scaling_lengths=(256, 512, 1024), scaling_length_examples=4,
    export_tokens=None, export_held_out=None, pipeline_stages=None, sweep_points=None, sweep_overrides={},
)
QUICK = Sizes(
    train_batch=2, train_max_length=256, train_batches=1, qlora_batch=2,
    gen_prompts=2, gen_new_tokens=4, gen_batch_sizes=(1, 2),
    scaling_examples=(2, 4), scaling_examples_length=48, scaling_lengths=(32, 64), scaling_length_examples=2,
    export_tokens=2, export_held_out=1, pipeline_stages=("00",), sweep_points=2,
    sweep_overrides={"max_steps": 1, "eval_steps": 1, "save_steps": 1, "max_new_tokens": 4},
)


def _recipe(**overrides):
    from .. import pipeline

    return recipe.load(pipeline.repo_root() / PARAMS, overrides)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
