"""Seed recipes: CUDA-only settings are errors on CPU, smoke mode maps them and keeps the method, and every seed smoke-runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medcot_lib import models, recipe, smoke, train
from medcot_lib.errors import MedcotError

SEEDS = sorted(p for p in Path("params").glob("*.yaml") if p.name != "cpu-demo.yaml")


def test_there_are_five_seed_recipes():
    assert len(SEEDS) == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_only_settings_are_an_error_outside_smoke_mode():
    cfg = recipe.load("params/qwen3-8b-qlora.yaml")
    with pytest.raises(MedcotError, match=r"needs a CUDA GPU for optim: paged_adamw_8bit, bf16: True.*--smoke"):
        models.check_hardware(cfg)
    with pytest.raises(MedcotError, match="backend: unsloth needs a CUDA GPU"):
        train.resolve_backend(recipe.load("params/deepseek-r1-distill-llama-8b-unsloth.yaml"))
    assert train.resolve_backend(cfg.model_copy(update={"backend": "auto"})) == "hf"


def test_smoke_keeps_the_method_and_maps_only_what_it_must():
    cfg = recipe.load("params/llama31-8b-hematology-dora.yaml")
    smoked, log = smoke.smoke(cfg)
    kept = ["use_dora", "load_in_4bit", "lora_r", "lora_alpha", "lora_target_modules", "prompt_style", "system_prompt",
            "packing", "completion_only_loss", "lr_scheduler_type", "warmup_steps", "learning_rate",
            "bnb_4bit_use_double_quant", "activation_checkpointing", "seed"]
    assert {k: getattr(smoked, k) for k in kept} == {k: getattr(cfg, k) for k in kept}
    assert smoked.model_name_or_path == models.DEFAULT_MODEL and smoked.optim == "adamw_torch"
    assert (smoked.per_device_train_batch_size, smoked.gradient_accumulation_steps) == (2, 2)  # from 8 x 4
    # The seed trains on distilled reasoning; the embedded teacher is rarely right, so the sources' answers back it up.
    assert [s.path for s in smoked.dataset_mixture] == ["run:distilled", "bundled:medqa", "bundled:pubmedqa"]
    assert [s.weight for s in smoked.dataset_mixture] == [1.0, 0.5, 0.1]
    assert (smoked.teacher_model, smoked.teacher_backend, smoked.distill_attempts) == (models.DEFAULT_MODEL, "llamacpp", 2)
    assert [s.max_samples for s in smoked.distill_sources] == [smoke.SMOKE_DISTILL_QUESTIONS] * 2
    assert "smoke: optim 'paged_adamw_32bit' -> 'adamw_torch'" in log and "smoke: tf32 True -> False" in log
    assert all(line.startswith("smoke: ") for line in log)
    models.check_hardware(smoked)  # nothing CUDA-only is left


@pytest.mark.integration
@pytest.mark.parametrize("path", SEEDS, ids=[p.stem for p in SEEDS])
def test_every_seed_recipe_smoke_runs_stages_00_to_03(path, tmp_path):
    run_dir = tmp_path / "smoke"
    result = subprocess.run([sys.executable, "-m", "medcot_lib", "run", str(path), "--smoke", "--run-dir", str(run_dir),
                             "--stages", "00", "00b", "01", "02", "03"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: model_name_or_path" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    distilling = recipe.load(path).distillation
    assert manifest["stages"].pop("00b_teacher_cot")["status"] == ("done" if distilling else "skipped")
    assert manifest["smoke"] and {s["status"] for s in manifest["stages"].values()} == {"done"}
    if distilling:
        stats = json.loads((run_dir / "distill" / "stats.json").read_text())
        assert stats["questions"] > 0 and stats["teacher"].startswith("llamacpp:")
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    cfg = recipe.load(path)
    assert adapter["use_dora"] == cfg.use_dora and adapter["r"] == cfg.lora_r
    if cfg.lora_target_modules != "all-linear":
        assert set(adapter["target_modules"]) == set(cfg.lora_target_modules)
    assert json.loads((run_dir / "metrics" / "03_qlora_train.json").read_text())["global_step"] == smoke.SMOKE_STEPS
