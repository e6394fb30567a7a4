"""Read a GGUF file back: its metadata (architecture, chat template, tokenizer) and the tensor types written.

K-quants need rows that are a multiple of 256 values; llama.cpp quietly falls back to another type elsewhere
(SmolLM2's 576-wide rows), so the tensor types actually written are read back.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

K_QUANT_ROW = 256  # values per K-quant super-block: a K-quant tensor's row width must be a multiple of this
LOSSLESS_TYPES = ("F32", "F16", "BF16")  # should reproduce the merged model's greedy output exactly


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
