"""Recipes: one YAML file per experiment, validated here with messages that name the key.

A recipe's keys are also the notebooks' papermill parameters, so
`papermill NB.ipynb OUT.ipynb -f params/cpu-demo.yaml -p seed 7` works, and so does
`medcot run params/cpu-demo.yaml -p seed 7`. Field names follow TRL/PEFT where they exist.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import MedcotError
from .fileio import read_utf8

# The embedded SmolLM2-135M-Instruct (see models.EMBEDDED_MODELS): every recipe default and smoke run uses it.
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
# random:NAME[:tiny] is a seeded, untrained model of a real model's shape (random_models.py): for memory and speed.
RANDOM_PREFIX = "random:"

BUNDLED_PREFIX = "bundled:"
DISTILLED = "run:distilled"  # the teacher-written set that stage 00b stores in this run (distill/distilled.json)
# Bundled sample files, named by the schema they imitate. All are original, educational text.
BUNDLED_FILES = {
    "medical-o1": "medical_o1_sample.json",
    "medical-o1-concise": "medical_o1_concise_sample.json",
    "medqa": "medqa_sample.jsonl",
    "pubmedqa": "pubmedqa_ori_pqal_sample.json",
    "pubmedqa-ground-truth": "pubmedqa_test_ground_truth_sample.json",
    "medmcqa": "medmcqa_raw_sample.json",
    "medmcqa-converted": "medmcqa_converted_sample.jsonl",
    "reasonmed": "reasonmed_sample.json",
    "messages": "chat_messages_sample.jsonl",
    "sharegpt": "sharegpt_sample.json",
}
FORMATS = ("auto", "medical_o1", "mcq", "pubmedqa", "medmcqa", "reasonmed", "messages", "sharegpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def bundled_path(name: str) -> Path:
    """Path of a bundled sample file, from its `bundled:NAME` reference."""
    key = name.removeprefix(BUNDLED_PREFIX)
    if key not in BUNDLED_FILES:
        raise MedcotError(f"unknown bundled dataset '{name}' (expected one of: {', '.join(BUNDLED_PREFIX + k for k in BUNDLED_FILES)})")
    return Path(str(resources.files("medcot_lib") / "sample_data" / BUNDLED_FILES[key]))


def is_local_file(path: str) -> bool:
    return path.endswith((".json", ".jsonl")) or path.startswith((".", "/", "~"))


def is_dataset_dir(path: str) -> bool:
    """A local directory laid out like a hub dataset (README.md `configs:` and data files), read by `load_dataset`."""
    return is_local_file(path) and Path(path).expanduser().is_dir()


def _check_data_reference(path: str) -> str:
    if path == DISTILLED:
        return path
    if path.startswith(BUNDLED_PREFIX):
        if not bundled_path(path).is_file():
            raise ValueError(f"bundled file for {path} is missing from the installed package (reinstall medcot)")
    elif is_local_file(path):
        if not Path(path).expanduser().exists():
            raise ValueError(f"file not found: {path}")
    elif not HUB_ID.match(path):
        raise ValueError(f"'{path}' is neither bundled:NAME, a .json/.jsonl file, nor a hub id like org/name")
    return path


class DatasetSource(BaseModel):
    """One data source: a bundled sample, a local .json/.jsonl file, or a hub dataset id."""

    model_config = ConfigDict(extra="forbid")

    path: str  # bundled:NAME, a local .json/.jsonl file, a hub id, or a local directory laid out like a hub dataset
    name: str | None = None  # label used in reports; defaults to the file or dataset name
    format: Literal[FORMATS] = "auto"  # type: ignore[valid-type]
    config: str | None = None  # hub (or hub-layout directory) config, e.g. en, zh, en_mix, zh_mix for medical-o1
    split: str = "train"  # hub split
    ground_truth: str | None = None  # PubMedQA {pmid: decision} file selecting the official test split
    weight: float = Field(1.0, gt=0, le=1)  # fraction of this source to keep (after filtering)
    max_samples: int | None = Field(None, gt=0)  # cap on items kept from this source

    _path_ok = field_validator("path")(_check_data_reference)

    @field_validator("ground_truth")
    @classmethod
    def _ground_truth_ok(cls, value: str | None) -> str | None:
        return None if value is None else _check_data_reference(value)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.path.startswith(BUNDLED_PREFIX):
            return self.path.removeprefix(BUNDLED_PREFIX)
        if self.path == DISTILLED:
            return "distilled"
        if is_dataset_dir(self.path):
            return Path(self.path).name + (f"-{self.config}" if self.config else "")
        if is_local_file(self.path):
            return Path(self.path).stem
        return self.path.split("/")[-1] + (f"-{self.config}" if self.config else "")


class Recipe(BaseModel):
    """Every knob of a run. Unknown keys are errors, so a typo cannot be silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    run_name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    # model
    model_name_or_path: str = DEFAULT_MODEL
    trust_remote_code: bool = False
    # data
    dataset_mixture: list[DatasetSource] = Field([DatasetSource(path="bundled:medical-o1")], min_length=1)
    eval_datasets: list[DatasetSource] = []
    min_cot_chars: int = Field(0, ge=0)  # drop training items whose reasoning is shorter
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)  # word-shingle Jaccard at or above which items are duplicates
    decontamination_chars: int = Field(64, ge=0)  # drop training items sharing this long a substring with eval data; 0: off
    val_size: float = Field(0.05, ge=0)  # below 1: a ratio; 1 or more: a count
    test_size: float = Field(0.05, ge=0)
    seed: int = 42
    # prompt
    prompt_style: Literal["think", "instruction", "native"] = "think"
    system_prompt: str | None = None  # None: the style's default (think) or none (native, instruction)
    max_length: int = Field(1024, gt=0)  # tokens per training sequence (TRL's name for max_seq_length)
    # generation (transformers GenerationConfig names); greedy by default, so reruns give identical text
    max_new_tokens: int = Field(512, gt=0)
    do_sample: bool = False  # true: sample with temperature and top_p (the seeds used 0.6 and 0.9 / 0.95)
    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    generation_batch_size: int = Field(8, gt=0)  # prompts per batch, length-sorted and left-padded
    # evaluation (04); an eval source's max_samples is a seeded subsample (decontamination still uses the whole set)
    # Generation backend of stages 01 and 04. auto: llamacpp on a machine without a CUDA GPU when the gguf extra is
    # installed and the base is not 4-bit, else hf. hf: base + adapter, exact; llamacpp: F16 GGUFs (fast on CPU); vllm: CUDA
    eval_backend: Literal["auto", "hf", "llamacpp", "vllm"] = "auto"
    eval_test_split: bool = True  # also score the held-out test split as an open-ended set (ROUGE-L, token F1)
    eval_subsample_seed: int = 0  # fixed seed for max_samples subsamples, independent of the training seed
    eval_side_by_side: int = Field(3, ge=0)  # items per eval set shown side by side (plus the showcase prompts)
    bootstrap_resamples: int = Field(1000, ge=100)  # resamples behind every 95% confidence interval
    # teacher CoT distillation (00b): the teacher writes reasoning, kept only when its answer matches gold
    distillation: bool = False  # run stage 00b; train on its output by listing `path: run:distilled` in dataset_mixture
    teacher_model: str | None = None  # hub id, local directory, embedded:NAME, or (llamacpp) a .gguf file
    teacher_backend: Literal["hf", "llamacpp"] = "llamacpp"  # llamacpp: any GGUF, fast on CPU; hf: transformers
    teacher_load_in_4bit: bool = False  # hf teacher in bitsandbytes 4-bit (the seed's 8B teacher on one GPU)
    teacher_system_prompt: str | None = None  # None: the teacher template's own; set one for teachers without a thinking mode
    distill_sources: list[DatasetSource] = []  # questions to distill: weight is the fraction kept, max_samples a cap
    distill_attempts: int = Field(4, ge=1)  # k sampled attempts per question before it is rejected
    distill_keep_unverified: bool = False  # keep questions without a gold answer, marked unverified
    distill_max_new_tokens: int = Field(2048, gt=0)  # teacher budget for reasoning + answer
    distill_temperature: float = Field(0.6, gt=0)  # sampled attempts (R1-style teachers are tuned for 0.6)
    distill_top_p: float = Field(0.95, gt=0, le=1)
    # model loading (TRL ModelConfig names)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 where supported, fp32 on CPU
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    load_in_4bit: bool = False  # QLoRA: bitsandbytes 4-bit base weights
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: same as dtype
    # How the packed 4-bit weights are stored. auto: uint8, or the compute dtype under FSDP, which shards tensors of one
    # dtype only (the FSDP-QLoRA recipe); an explicit value must then equal the compute dtype.
    bnb_4bit_quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    # adapter (PEFT LoraConfig, with TRL's lora_ prefix)
    lora_r: int = Field(16, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"  # may include lm_head
    layers_to_transform: list[int] | None = None  # PEFT: adapt only these decoder layers (0-based); None: all of them
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA; combines with load_in_4bit
    # training (TRL SFTConfig / TrainingArguments names)
    backend: Literal["hf", "unsloth", "auto"] = "hf"  # auto: Unsloth when a CUDA GPU is present and unsloth imports
    completion_only_loss: bool = True  # loss on reasoning + answer only, never on the prompt
    packing: bool = True  # padding-free: a batch is one row, samples isolated by a block-diagonal mask
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # -1: train for num_train_epochs
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)  # at one process; split across num_processes (see below)
    # Distributed training (stage 03 only; accelerate launch's names). The global batch, per_device_train_batch_size x
    # gradient_accumulation_steps, stays the recipe's whatever the process count: each of N processes accumulates
    # gradient_accumulation_steps / N micro-batches, so 1, 2 or 8 processes train the same curve (and a checkpoint
    # resumes under another count). num_processes counts all processes on all machines; 1 trains in the notebook's kernel.
    num_processes: int = Field(1, gt=0)
    accelerate_config: str | None = None  # ddp | fsdp | zero3 (params/accelerate/NAME.yaml) or an accelerate config file
    lr_scheduler_type: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_steps: float = Field(0.05, ge=0)  # below 1: a ratio of total steps; from 1: a step count
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: Literal["adamw_torch", "adafactor", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw_torch"
    activation_checkpointing: bool = False  # recompute activations in backward (transformers 5's name for gradient checkpointing)
    bf16: bool = False
    fp16: bool = False
    tf32: bool = False
    logging_steps: int = Field(1, gt=0)
    eval_steps: int = Field(10, gt=0)
    eval_on_start: bool = True  # evaluate before the first step too, so the loss curve starts from the base model's loss
    save_steps: int = Field(10, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    load_best_model_at_end: bool = True  # by eval_loss
    report_to: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]  # wandb reads WANDB_API_KEY from the environment
    # export (05): merge into a full-precision base, HF -> GGUF, llama.cpp quantization, verification, deployment files
    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # merge precision; auto: same rule as dtype
    gguf_outtype: Literal["f16", "bf16"] = "f16"  # the unquantized GGUF every quantization starts from
    gguf_quant_types: list[str] = ["Q4_K_M", "Q5_K_M", "Q8_0"]  # llama.cpp types; checked against llama_cpp by stage 05
    gguf_agreement_tokens: int = Field(32, gt=0)  # greedy tokens per showcase prompt compared with the merged HF model
    push_to_hub: bool = False  # upload adapter, merged model and GGUFs; the token comes from HF_TOKEN only
    hub_model_id: str | None = Field(None, validate_default=True)  # org/name of the model repository (needed by push_to_hub)
    # chat (06): a batch run cannot wait for a browser, so stage 06 is skipped unless this is true; then it starts the
    # app on the run's model, checks that it answers once and closes it. Chat with `medcot chat RUN_DIR` or the notebook.
    chat_demo: bool = False

    @field_validator("gguf_quant_types")
    @classmethod
    def _quant_types_ok(cls, values: list[str]) -> list[str]:
        # Names only: the installed llama.cpp's list is authoritative and stage 05 checks it; recipes must validate
        # on machines without the gguf extra.
        names = [v.strip().upper() for v in values]
        for name in names:
            if not re.fullmatch(r"[A-Z0-9_]+", name):
                raise ValueError(f"'{name}' is not a llama.cpp quantization type name (e.g. Q4_K_M, Q5_K_M, Q8_0)")
            if name in ("F16", "BF16", "F32"):
                raise ValueError(f"{name} is not a quantization; the unquantized file's type is gguf_outtype")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate types in {names}")
        return names

    @field_validator("layers_to_transform")
    @classmethod
    def _layers_ok(cls, values: list[int] | None) -> list[int] | None:
        if values is None:
            return None
        if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
            raise ValueError("expected distinct layer indices from 0 (e.g. [15, 16, 17]), or null for every layer")
        return sorted(values)

    @field_validator("hub_model_id")
    @classmethod
    def _hub_model_id_ok(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("push_to_hub"):
            raise ValueError("push_to_hub is true, so a model repository is needed (expected org/name)")
        if value is not None and not HUB_ID.match(value):
            raise ValueError(f"'{value}' is not a hub repository id (expected org/name)")
        return value

    @field_validator("val_size", "test_size")
    @classmethod
    def _size_ok(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a size of 1 or more is a count and must be a whole number")
        return value

    @model_validator(mode="after")
    def _distillation_consistent(self) -> Recipe:
        uses_distilled = any(s.path == DISTILLED for s in self.dataset_mixture)
        if uses_distilled and not self.distillation:
            raise ValueError(f"dataset_mixture lists {DISTILLED}, which stage 00b writes only with distillation: true")
        if self.distillation and not self.teacher_model:
            raise ValueError("distillation is true, so teacher_model is needed (a hub id, local directory, embedded:NAME or .gguf file)")
        if self.distillation and not self.distill_sources:
            raise ValueError("distillation is true, so distill_sources must list the questions to distill")
        if any(s.path == DISTILLED for s in [*self.eval_datasets, *self.distill_sources]):
            raise ValueError(f"{DISTILLED} is training data; it cannot be an eval set or a distill source")
        return self

    @model_validator(mode="after")
    def _global_batch_splits(self) -> Recipe:
        if self.gradient_accumulation_steps % self.num_processes:
            raise ValueError(
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} does not split across num_processes "
                f"{self.num_processes}: the global batch (per_device_train_batch_size x gradient_accumulation_steps = "
                f"{self.per_device_train_batch_size * self.gradient_accumulation_steps}) is kept whatever the process "
                f"count, so gradient_accumulation_steps must be a multiple of num_processes (a larger global batch "
                f"is a change of recipe: raise gradient_accumulation_steps)")
        return self

    @model_validator(mode="after")
    def _splits_fit(self) -> Recipe:
        ratios = [v for v in (self.val_size, self.test_size) if v < 1]
        if sum(ratios) >= 1:
            raise ValueError(f"val_size + test_size ratios must leave training data (got {sum(ratios)})")
        return self


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid recipe"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(Recipe.model_fields)) if len(err["loc"]) == 1 else ", ".join(DatasetSource.model_fields)
            lines.append(f"  {key}: unknown key (known keys: {known})")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = err.get("input")
            lines.append(f"  {key}: {err['msg']} (got {got!r})")
    return "\n".join(lines)


# Keys that upstream renamed: a recipe using the old name gets the new one in its error message.
RENAMED_KEYS = {"gradient_checkpointing": "activation_checkpointing"}
# How stage 03 is launched, not what the run computes (the global batch is kept): outside the run's identity.
LAUNCH_KEYS = ("num_processes", "accelerate_config")


def validate(values: dict[str, Any], origin: str = "recipe") -> Recipe:
    renamed = [f"  {old}: renamed {new} (transformers 5 deprecates the old name)" for old, new in RENAMED_KEYS.items() if old in values]
    if renamed:
        raise MedcotError("\n".join([f"{origin}: invalid recipe", *renamed]))
    try:
        return Recipe.model_validate(values)
    except ValidationError as exc:
        raise MedcotError(_format_validation_error(exc, origin)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MedcotError(f"{path}: recipe file not found")
    try:
        values = yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as exc:
        raise MedcotError(f"{path}{_yaml_where(exc)}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(values, dict):
        raise MedcotError(f"{path}: a recipe must be a mapping of keys to values")
    return values


def _yaml_where(exc: yaml.YAMLError) -> str:
    """The line where the broken construct starts (its context), else where parsing stopped."""
    mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
    return f", line {mark.line + 1}" if mark else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    mark = getattr(exc, "problem_mark", None)
    text = ": ".join(p for p in parts if p) or str(exc)
    return text + (f" at line {mark.line + 1}" if mark and getattr(exc, "context_mark", None) else "")


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    values = read_yaml(path)
    values.update(overrides or {})
    return validate(values, origin=str(path))


def from_namespace(namespace: dict[str, Any]) -> Recipe:
    """Build the recipe from a notebook's parameters (its globals after papermill injection)."""
    values = {k: namespace[k] for k in Recipe.model_fields if k in namespace}
    return validate(values, origin="notebook parameters")


def to_parameters(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain papermill parameters (lists and dicts of literals)."""
    return recipe.model_dump(mode="json", exclude_none=False)


# --------------------------------------------------------------------------- hardware

CUDA_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def cuda_only_settings(cfg: Recipe) -> dict[str, Any]:
    """The recipe's settings that only work on a CUDA GPU, with the CPU value smoke mode uses."""
    mapped = {}
    if cfg.optim in CUDA_ONLY_OPTIMIZERS:
        mapped["optim"] = "adamw_torch"
    for flag in ("bf16", "fp16", "tf32"):
        if getattr(cfg, flag):
            mapped[flag] = False
    if cfg.attn_implementation == "flash_attention_2":
        mapped["attn_implementation"] = "sdpa"
    if cfg.backend == "unsloth":
        mapped["backend"] = "hf"
    return mapped
