"""Verify every GGUF file against the merged HF model (fp32) before it is deployed.

Per file: structure (does llama.cpp render and tokenize prompts as the HF tokenizer does, with the same BOS
and EOS?), greedy agreement on the showcase prompts (near-ties excepted), held-out perplexity and speed. A
flagged file is printed with its likely cause; `ensure_usable` fails the stage on the structural causes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from .. import prompts
from ..data import Record
from ..errors import MedcotError
from ..generate import stop_ids
from ..llamacpp import captured_log, llama_threads, log_tail
from ..prompts import SHOWCASE
from .gguf_info import LOSSLESS_TYPES, gguf_metadata, tensor_types
from .inputs import _llama_cpp
from .merging import _prompts, _saved_tokenizer
from .paths import merged_dir

# A greedy step whose top-2 HF logits are closer than this is a near-tie that weight rounding may flip; Q8_0
# logits differ from fp32 by up to ~1.8 on the embedded model, so flips at such steps are not bugs.
NEAR_TIE_LOGITS = 0.5
MAX_PERPLEXITY_RATIO = 1.5  # a file whose held-out perplexity is 50% above the merged model's is flagged
# Held-out tokens scored per file: perplexity runs every position through the model once per file, 80-250
# tokens/s for the 135M model on the 2-core demo machine, so the whole cpu-demo test split (13k tokens) would cost
# minutes per file; 2,048 tokens separate F16 (delta ~0.001) from Q4_K_M (~2.5) by three orders of magnitude.
HELD_OUT_TOKENS = 2048


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
