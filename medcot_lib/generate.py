"""Batched generation with the training template: used by the baseline (01) and later stages.

Prompts are rendered by `prompts.render(..., with_target=False)`, the same function that builds
training sequences. Batches are length-sorted (so little padding is wasted), left-padded (so every
row's generation starts right after its prompt), and results come back in the input order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import prompts
from .answers import split_think
from .data import Record


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    batch_size: int
    seed: int

    @classmethod
    def from_recipe(cls, cfg) -> Decoding:
        return cls(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.generation_batch_size, cfg.seed)

    def kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass
class Generation:
    id: str
    source: str
    prompt: str
    output: str
    reasoning: str | None
    answer: str
    prompt_tokens: int
    new_tokens: int
    stopped: bool  # ended with an end-of-turn token rather than by hitting max_new_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_backend(cfg) -> str:
    """The generation backend of stages 01 and 04: the recipe's eval_backend, with auto decided for this machine.

    auto is llama.cpp on a machine without a CUDA GPU when llama-cpp-python (the gguf extra) imports, since its
    parallel decoding is several times faster there than HF batches (`medcot bench generate`); hf otherwise, and
    always for a 4-bit base, which only the hf backend evaluates as trained.
    """
    import importlib.util

    if cfg.eval_backend != "auto":
        return cfg.eval_backend
    llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    return "llamacpp" if llama_cpp and not torch.cuda.is_available() and not cfg.load_in_4bit else "hf"


def stop_ids(tokenizer, generation_config) -> list[int]:
    """Token ids that end a generation: the generation config's EOS ids and the tokenizer's."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, records: list[Record], style: prompts.PromptStyle, decoding: Decoding, *, progress: bool = True) -> list[Generation]:
    """Generate one completion per record, batched and length-sorted; returned in input order."""
    from tqdm.auto import tqdm

    texts, encoded = rendered_ids(records, tokenizer, style)
    order = sorted(range(len(records)), key=lambda i: len(encoded[i]), reverse=True)
    stop = stop_ids(tokenizer, model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    results: list[Generation | None] = [None] * len(records)
    torch.manual_seed(decoding.seed)
    model.eval()
    batches = [order[i : i + decoding.batch_size] for i in range(0, len(order), decoding.batch_size)]
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch])
        attention = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                                 max_new_tokens=decoding.max_new_tokens, eos_token_id=stop, pad_token_id=pad,
                                 **decoding.kwargs())
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            stopped_at = next((k for k, t in enumerate(new) if t in stop), None)
            new = new[: stopped_at + 1] if stopped_at is not None else new
            text = tokenizer.decode(new, skip_special_tokens=True)
            results[i] = _from_text(records[i], texts[i], len(encoded[i]), text, len(new), stopped_at is not None)
    return results


def rendered_ids(records: list[Record], tokenizer, style: prompts.PromptStyle) -> tuple[list[str], list[list[int]]]:
    """Prompt strings and their token ids, exactly as `generate` feeds them to the HF model."""
    rendered = [prompts.render(r, tokenizer, style, with_target=False) for r in records]
    return [x.prompt for x in rendered], [tokenizer(x.prompt, add_special_tokens=x.add_special_tokens)["input_ids"] for x in rendered]


def _from_text(record: Record, prompt: str, prompt_tokens: int, text: str, new_tokens: int, stopped: bool) -> Generation:
    reasoning, answer = split_think(text)
    return Generation(record.id, record.source, prompt, text, reasoning, answer, prompt_tokens, new_tokens, stopped)


def generate_gguf(path: str | Path, tokenizer, records: list[Record], style: prompts.PromptStyle, decoding: Decoding,
                  *, progress: bool = True) -> list[Generation]:
    """Generate with a GGUF file through llama.cpp, `decoding.batch_size` sequences at a time.

    The prompt is rendered and tokenized by the HF tokenizer, so template and BOS handling cannot
    differ from training, and the new tokens are decoded by it too; llama.cpp only runs the network.
    Greedy is argmax; sampling mirrors HF's settings (no top-k, no min-p, no repetition penalty).
    """
    from tqdm.auto import tqdm

    from .llamacpp import ParallelGGUF, Sampling

    texts, encoded = rendered_ids(records, tokenizer, style)
    sampling = Sampling(decoding.temperature, decoding.top_p, decoding.seed) if decoding.do_sample else None
    slot = max(map(len, encoded)) + decoding.max_new_tokens
    with ParallelGGUF(path, parallel=min(decoding.batch_size, len(records)), slot_tokens=slot) as model, \
            tqdm(total=len(records), desc="generating (llama.cpp)", unit="prompt", disable=not progress) as bar:
        outputs = model.generate(encoded, decoding.max_new_tokens, sampling, progress=bar)
    return [_from_text(record, prompt, len(ids), tokenizer.decode(new, skip_special_tokens=True), len(new), stopped)
            for record, prompt, ids, (new, stopped) in zip(records, texts, encoded, outputs, strict=True)]


def generate_vllm(cfg, adapter: Path, tokenizer, records: list[Record], style: prompts.PromptStyle,
                  decoding: Decoding) -> dict[str, list[Generation]]:
    """Base and base + adapter with vLLM (CUDA only): the adapter is served as a LoRA request, not merged."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from .models import resolve

    texts, encoded = rendered_ids(records, tokenizer, style)
    # vLLM sizes its LoRA kernels by a maximum rank from a fixed menu of powers of two (8, 16, 32, ...).
    max_rank = max(8, 1 << (cfg.lora_r - 1).bit_length())
    llm = LLM(model=resolve(cfg.model_name_or_path), tokenizer=resolve(cfg.model_name_or_path), enable_lora=True,
              max_lora_rank=max_rank, max_loras=1, seed=decoding.seed, trust_remote_code=cfg.trust_remote_code,
              max_model_len=max(map(len, encoded)) + decoding.max_new_tokens)
    params = SamplingParams(max_tokens=decoding.max_new_tokens, seed=decoding.seed,
                            temperature=decoding.temperature if decoding.do_sample else 0.0,
                            top_p=decoding.top_p if decoding.do_sample else 1.0)
    inputs = [{"prompt_token_ids": ids} for ids in encoded]
    results = {}
    for label, lora in (("base", None), ("fine-tuned", LoRARequest("medcot-adapter", 1, str(adapter)))):
        outputs = llm.generate(inputs, params, lora_request=lora)
        results[label] = [_from_text(r, prompt, len(ids), o.outputs[0].text, len(o.outputs[0].token_ids),
                                     o.outputs[0].finish_reason == "stop")
                          for r, prompt, ids, o in zip(records, texts, encoded, outputs, strict=True)]
    return results


def length_stats(generations: list[Generation]) -> dict:
    """Prompt and generated token counts, and how often the budget cut a generation short."""
    import numpy as np

    def describe(values):
        values = np.asarray(values)
        return {"mean": float(values.mean()), "median": float(np.median(values)), "p95": float(np.percentile(values, 95)),
                "max": int(values.max())}

    return {
        "n": len(generations),
        "prompt_tokens": describe([g.prompt_tokens for g in generations]),
        "new_tokens": describe([g.new_tokens for g in generations]),
        "hit_max_new_tokens": sum(not g.stopped for g in generations),
        "with_think_block": sum(g.reasoning is not None for g in generations),
    }


def check_budget(cfg, run_dir: str | Path) -> str | None:
    """Warn (and return the warning) when max_new_tokens is below the 95th percentile of the training targets' length
    that stage 00 measured: a model that learned the format would be cut off inside its reasoning, scored as wrong."""
    import json
    import warnings

    stats = Path(run_dir) / "metrics" / "00_dataset_inspection.json"
    budget = json.loads(stats.read_text()).get("generation_budget") if stats.is_file() else None
    if not budget or cfg.max_new_tokens >= budget["target_tokens"]["p95"]:
        return None
    message = (f"max_new_tokens={cfg.max_new_tokens} is below the 95th percentile of the training targets' length "
               f"({budget['target_tokens']['p95']:.0f} tokens, reasoning + answer, {stats}): trained answers will be cut off "
               f"inside their reasoning and scored as wrong; stage 00 recommends "
               f"max_new_tokens={budget['recommended_max_new_tokens']}")
    warnings.warn(message, stacklevel=2)
    return message
