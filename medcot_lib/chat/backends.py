"""The two models of the chat, each streaming tokens: llama.cpp on the run's GGUFs, or transformers with the adapter
switched on and off; and which backend a run can use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .. import export, generate, models
from ..errors import MedcotError
from ..llamacpp import ParallelGGUF, Sampling, pick_token

# Tokens of context per model: the KV cache holds a prompt and its answer (an 8B Llama needs 0.5 GB per model here).
CONTEXT_CAP = 4096


class GGUFStreamer:
    """A GGUF file decoding one prompt at a time through llama.cpp."""

    def __init__(self, path: str | Path, context: int):
        self.path = Path(path)
        self.model = ParallelGGUF(self.path, parallel=1, slot_tokens=context)

    def stream(self, ids: list[int], max_new_tokens: int, sampling: Sampling | None) -> Iterator[int]:
        return self.model.stream(ids, max_new_tokens, sampling)

    def close(self) -> None:
        self.model.close()


class HFStreamer:
    """Base + adapter in transformers, one token per step with a KV cache; the adapter is switched off for the base."""

    def __init__(self, model, *, adapter: bool, stop: list[int]):
        self.model, self.adapter, self.stop = model, adapter, set(stop)

    def stream(self, ids: list[int], max_new_tokens: int, sampling: Sampling | None) -> Iterator[int]:
        import numpy as np
        import torch
        from transformers import DynamicCache

        rng = np.random.default_rng([sampling.seed, 0]) if sampling else None  # the llama.cpp backend's stream
        cache, feed = DynamicCache(config=self.model.config), torch.tensor([ids], device=self.model.device)
        for _ in range(max_new_tokens):
            switch = contextlib.nullcontext() if self.adapter else self.model.disable_adapter()
            with switch, torch.no_grad():
                logits = self.model(input_ids=feed, past_key_values=cache, use_cache=True).logits[0, -1]
            token = pick_token(logits.float().cpu().numpy(), sampling, rng)
            if token in self.stop:
                return
            yield token
            feed = torch.tensor([[token]], device=self.model.device)

    def close(self) -> None:
        pass



def _run_first(stage: str, run_dir: Path, why: str, otherwise: str = "") -> MedcotError:
    return MedcotError(f"{run_dir}: {why}. Run stage {stage} first: `medcot run RECIPE --run-dir {run_dir} --stages "
                       f"{stage.split('_')[0]}` (or `medcot run RECIPE` for the whole pipeline){otherwise}")


def tuned_gguf(cfg, run_dir: str | Path) -> Path | None:
    """The fine-tuned model's unquantized GGUF: stage 05's export, else the one stage 04's llamacpp backend made."""
    candidates = [export.gguf_path(cfg, run_dir, cfg.gguf_outtype), Path(run_dir) / "eval" / "gguf" / "merged-f16.gguf"]
    return next((path for path in candidates if path.is_file()), None)


def choose_backend(cfg, run_dir: str | Path, requested: str | None = None) -> str:
    """llamacpp or hf: the request (else the recipe's eval_backend), with auto decided as stage 04 decides it.

    auto falls back to hf when the run has an adapter but no fine-tuned GGUF; an explicit llamacpp without one is an
    error naming stage 05. A run without an adapter is an error naming stage 03.
    """
    run_path = Path(run_dir)
    requested = requested or cfg.eval_backend
    if requested == "vllm":
        raise MedcotError("the chat app runs the llamacpp or hf backend (vllm serves stage 04's batches only); "
                          "use --backend auto, llamacpp or hf")
    has_adapter = (run_path / "adapter" / "adapter_model.safetensors").is_file()
    if not has_adapter and tuned_gguf(cfg, run_path) is None:
        raise _run_first("03_qlora_train", run_path, "no trained adapter (adapter/) and no fine-tuned GGUF (export/gguf/)")
    backend = generate.resolve_backend(cfg.model_copy(update={"eval_backend": requested}))
    if backend == "llamacpp" and tuned_gguf(cfg, run_path) is None:
        if requested == "llamacpp":
            raise _run_first("05_gguf_export", run_path, "the llamacpp backend needs the fine-tuned model as a GGUF file "
                             f"({export.gguf_path(cfg, run_path, cfg.gguf_outtype).name}), and there is none",
                             "; or chat through transformers with --backend hf")
        return "hf"
    if backend == "hf" and not has_adapter:
        raise _run_first("03_qlora_train", run_path, "the hf backend needs the trained adapter (adapter/), and there is none")
    return backend


def context_window(cfg) -> int:
    """Tokens of context per model in the chat: the model's trained window, at most CONTEXT_CAP."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models.resolve(cfg.model_name_or_path), trust_remote_code=cfg.trust_remote_code)
    config = getattr(config, "text_config", None) or config
    return min(getattr(config, "max_position_embeddings", None) or CONTEXT_CAP, CONTEXT_CAP)

