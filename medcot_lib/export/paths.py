"""Where stage 05 writes its files, all under run_dir/export/.

merged/ (the merged checkpoint), gguf/<run_name>-<TYPE>.gguf, the Ollama Modelfile and the model card
(README.md).
"""

from __future__ import annotations

from pathlib import Path

EXPORT_DIR = "export"


def merged_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORT_DIR / "merged"


def gguf_path(cfg, run_dir: str | Path, gguf_type: str) -> Path:
    """run_dir/export/gguf/<run_name>-<TYPE>.gguf"""
    return Path(run_dir) / EXPORT_DIR / "gguf" / f"{cfg.run_name}-{gguf_type.upper()}.gguf"
