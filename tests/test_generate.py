"""Generation and the 4-bit stage on the embedded model: batching changes nothing, the 4-bit reload is exact."""

import pytest

from medcot_lib import baseline, generate, models, prompts, quantize, recipe
from medcot_lib.data import load_source
from medcot_lib.recipe import DatasetSource


@pytest.fixture(scope="module")
def cfg():
    return recipe.load("params/cpu-demo.yaml")


@pytest.fixture(scope="module")
def model(cfg):
    return models.load_model(cfg, four_bit=False)


def decoding(**kw):
    base = {"max_new_tokens": 20, "do_sample": False, "temperature": 0.6, "top_p": 0.95, "batch_size": 4, "seed": 0}
    return generate.Decoding(**{**base, **kw})


def test_batched_left_padded_generation_equals_one_at_a_time(cfg, model, tokenizer):
    mcq, _ = load_source(DatasetSource(path="bundled:medqa"))
    records = baseline.SHOWCASE[:3] + mcq[:2]  # prompts of quite different lengths
    style = prompts.PromptStyle.from_recipe(cfg)
    batched = generate.generate(model, tokenizer, records, style, decoding(batch_size=5), progress=False)
    single = generate.generate(model, tokenizer, records, style, decoding(batch_size=1), progress=False)
    assert [g.id for g in batched] == [r.id for r in records]  # input order restored after length sorting
    assert [g.output for g in batched] == [g.output for g in single]
    assert all(g.new_tokens <= 20 and g.prompt_tokens > 0 for g in batched)


def test_budget_and_stop_are_reported(cfg, model, tokenizer):
    style = prompts.PromptStyle.from_recipe(cfg)
    (cut,) = generate.generate(model, tokenizer, baseline.SHOWCASE[:1], style, decoding(max_new_tokens=3), progress=False)
    assert cut.new_tokens == 3 and not cut.stopped
    stats = generate.length_stats([cut])
    assert stats["hit_max_new_tokens"] == 1 and stats["new_tokens"]["max"] == 3


def test_sampling_is_reproducible_with_a_seed(cfg, model, tokenizer):
    style = prompts.PromptStyle.from_recipe(cfg)
    runs = [generate.generate(model, tokenizer, baseline.SHOWCASE[:2], style, decoding(do_sample=True, seed=3), progress=False)
            for _ in range(2)]
    assert [g.output for g in runs[0]] == [g.output for g in runs[1]]


def test_four_bit_checkpoint_reloads_with_identical_greedy_output(cfg, tokenizer, tmp_path):
    import bitsandbytes as bnb

    quantized = models.load_model(cfg, four_bit=True)
    saved = quantize.save(quantized, tokenizer, tmp_path)
    reloaded = quantize.reload(saved)
    layers = [m for m in reloaded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" for m in layers)
    check = quantize.reload_check(quantized, reloaded, tokenizer, baseline.SHOWCASE[:2], prompts.PromptStyle.from_recipe(cfg),
                                  decoding(max_new_tokens=12))
    assert check["identical"] and len(check["pairs"]) == 2
    quantize.ensure_identical(check)


def test_footprints_shrink_with_precision(cfg):
    rows = quantize.footprints(cfg)
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "4-bit nf4"]
    assert rows[0]["bytes"] > rows[1]["bytes"] > rows[2]["bytes"]
    assert rows[1]["vs fp32"] == 2.0


@pytest.fixture(scope="module")
def base_gguf(cfg, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from medcot_lib import export

    return export.to_gguf(export.base_checkpoint(cfg), tmp_path_factory.mktemp("gguf") / "base-F16.gguf", "f16")


def test_parallel_llama_cpp_generation_equals_hf_token_for_token(cfg, model, tokenizer, base_gguf):
    """Eight prompts through 3 parallel slots: slots are refilled as sequences end, and the last ones run on with
    scattered sequence ids; every output must still be HF's greedy output (F16 weights, isolated KV cells)."""
    mcq, _ = load_source(DatasetSource(path="bundled:medqa"))
    records = (mcq * 2)[:8]
    style = prompts.PromptStyle.from_recipe(cfg)
    hf = generate.generate(model, tokenizer, records, style, decoding(max_new_tokens=24, batch_size=1), progress=False)
    llama = generate.generate_gguf(base_gguf, tokenizer, records, style, decoding(max_new_tokens=24, batch_size=3),
                                   progress=False)
    assert [g.id for g in llama] == [r.id for r in records]
    assert [g.output for g in llama] == [g.output for g in hf]
    assert [(g.new_tokens, g.stopped) for g in llama] == [(g.new_tokens, g.stopped) for g in hf]


def test_llama_cpp_leaves_a_busy_core_alone():
    """ggml's spinning workers stall on a core someone else holds, so llama.cpp takes only the idle ones."""
    import os
    import subprocess
    import sys
    import time

    from medcot_lib.llamacpp import llama_threads

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    busy = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cores[0]}}})\nwhile True: pass"])
    try:
        time.sleep(0.5)
        assert 1 <= llama_threads() <= len(cores) - 1
    finally:
        busy.kill()
        busy.wait()


def test_auto_backend_is_llama_cpp_on_a_cpu_with_the_gguf_extra_and_hf_for_a_4bit_base(cfg, monkeypatch):
    import importlib.util

    import torch

    assert generate.resolve_backend(cfg.model_copy(update={"eval_backend": "hf"})) == "hf"
    auto = cfg.model_copy(update={"eval_backend": "auto"})
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    assert generate.resolve_backend(auto) == ("llamacpp" if has_llama and not torch.cuda.is_available() else "hf")
    assert generate.resolve_backend(auto.model_copy(update={"load_in_4bit": True})) == "hf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert generate.resolve_backend(auto) == "hf"


def test_a_budget_below_the_training_targets_is_warned_about(cfg, tmp_path):
    import json

    assert generate.check_budget(cfg, tmp_path) is None  # stage 00 has not measured anything yet
    (tmp_path / "metrics").mkdir()
    budget = {"target_tokens": {"median": 150.0, "p95": 230.0, "max": 260}, "recommended_max_new_tokens": 256}
    (tmp_path / "metrics" / "00_dataset_inspection.json").write_text(json.dumps({"generation_budget": budget}))
    with pytest.warns(UserWarning, match=r"max_new_tokens=100 is below .* \(230 tokens.*recommends max_new_tokens=256"):
        generate.check_budget(cfg.model_copy(update={"max_new_tokens": 100}), tmp_path)
    assert generate.check_budget(cfg.model_copy(update={"max_new_tokens": 230}), tmp_path) is None
