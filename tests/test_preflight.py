"""Pre-flight: what can be checked before the first stage is checked then, every problem listed, nothing written."""

import json
import shutil
from pathlib import Path

import pytest

from medcot_lib import cli, preflight, recipe
from medcot_lib.errors import MedcotError

PARAMS = sorted(Path("params").glob("*.yaml"))
HUB_RECIPES = [p for p in PARAMS if p.name != "cpu-demo.yaml"]


def demo(**overrides):
    return recipe.load("params/cpu-demo.yaml", overrides)


def plan_for(cfg, run_dir, stages=None):
    stages = stages or ["00_dataset_inspection", "00b_teacher_cot", "01_baseline", "02_quantize", "03_qlora_train",
                        "04_adapter_eval", "05_gguf_export"]
    return preflight.check(cfg, Path(run_dir), stages)


def run_cli(capsys, *args):
    code = cli.main(["run", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_demo_plan_names_stages_data_model_steps_disk_and_smoke_mapping(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "params/cpu-demo.yaml", "--check", "--run-dir", tmp_path / "run")
    assert code == 0, out
    for expected in ("00_dataset_inspection", "05_gguf_export", "medical-o1-concise: 234 items", "LlamaForCausalLM, 134.5M weights",
                     "48 optimizer steps (max_steps) of 4 sequences", "GGUF f16 then Q4_K_M, Q8_0", "GGUF Q8_0: 0.13 GiB",
                     "smoke: max_steps 48 -> 3", "problems: none"):
        assert expected in out
    assert not (tmp_path / "run").exists(), "--check writes nothing"


@pytest.mark.parametrize("path", PARAMS, ids=[p.name for p in PARAMS])
def test_check_works_on_every_recipe_in_smoke_mode(path, capsys, tmp_path):
    code, out, _ = run_cli(capsys, path, "--check", "--smoke", "--run-dir", tmp_path / "run")
    assert code == 0 and "problems: none" in out, out
    assert "training:" in out and "disk:" in out and "smoke mode:" in out


@pytest.mark.parametrize("path", HUB_RECIPES, ids=[p.name for p in HUB_RECIPES])
def test_check_on_a_gpu_recipe_offline_prints_the_plan_and_names_what_is_missing(path, capsys, tmp_path):
    code, out, _ = run_cli(capsys, path, "--check", "--run-dir", tmp_path / "run")
    cfg = recipe.load(path)
    assert code == 2
    assert "stages:" in out and "training:" in out and "smoke mode would map:" in out
    assert f"could not load '{cfg.model_name_or_path}' from the Hugging Face Hub" in out
    assert "needs a CUDA GPU" in out
    hub_sources = [s.path for s in cfg.dataset_mixture + cfg.eval_datasets if "/" in s.path and not s.path.startswith("/")]
    assert all(f"dataset '{hub}' is neither in the local Hugging Face cache nor reachable" in out for hub in hub_sources)


def test_late_failures_are_caught_before_anything_is_written(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "params/cpu-demo.yaml", "--run-dir", run_dir, "-p", "gguf_quant_types", "[Q4_K_M, Q9_X]",
                           "-p", "lora_target_modules", "[q_proj, qkv]", "-p", "layers_to_transform", "[28, 30]",
                           "-p", "teacher_model", str(tmp_path / "absent.gguf"))
    assert code == 2 and "pre-flight found 3 problem(s) before any stage ran" in err
    assert "gguf_quant_types: ['Q9_X'] are not llama.cpp quantization types" in err
    assert "lora_target_modules: ['qkv'] are not linear modules of this model" in err
    assert "teacher_model" in err and "absent.gguf" in err
    assert not run_dir.exists()
    code, _, err = run_cli(capsys, "params/cpu-demo.yaml", "--run-dir", run_dir, "-p", "layers_to_transform", "[28, 30]")
    assert code == 2 and "layers_to_transform: [30] are not layers of this model (it has 30: 0 to 29)" in err


def test_bad_data_files_stop_the_run_before_stage_00(capsys, tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"question": "Caf\xe9?", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}\n')
    code, _, err = run_cli(capsys, "params/cpu-demo.yaml", "--run-dir", tmp_path / "run", "-p", "eval_datasets",
                           f"[{{path: {latin}}}]", "-p", "min_cot_chars", "5000")
    assert code == 2 and "pre-flight found 2 problem(s)" in err
    assert "latin.jsonl, line 1, field 'question': not valid UTF-8: byte 0xe9" in err
    assert "the quality step (setting `min_cot_chars=5000`) removed all 234" in err and "reasoning lengths" in err
    assert not (tmp_path / "run").exists()


def test_an_evaluation_with_nothing_to_score_is_caught_before_the_run(tmp_path):
    nothing = demo(eval_datasets=[], test_size=0)
    problems = plan_for(nothing, tmp_path / "run").problems
    assert any(p.startswith("stage 04 has nothing to evaluate: eval_datasets is empty") and "test_size: 0" in p for p in problems)
    assert not any("nothing to evaluate" in p for p in plan_for(nothing, tmp_path / "run", ["00_dataset_inspection"]).problems)
    assert not any("nothing to evaluate" in p for p in plan_for(demo(eval_datasets=[]), tmp_path / "run").problems)


def test_a_random_weight_model_is_planned_from_its_shipped_config_without_building_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCOT_CACHE", str(tmp_path / "cache"))
    plan = plan_for(demo(model_name_or_path="random:qwen3-8b", layers_to_transform=None), tmp_path / "run")
    assert any("random:qwen3-8b: Qwen3ForCausalLM, 8190.7M weights, 36 layers" in line for line in plan.facts["model"])
    assert not (tmp_path / "cache").exists()  # nothing was built or downloaded


def test_an_output_location_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    plan = plan_for(demo(), blocker / "run")
    assert any("the output location is not writable" in p and "a-file" in p for p in plan.problems)


def test_disk_estimate_sums_every_stage_and_refuses_a_full_disk(monkeypatch, tmp_path):
    plan = plan_for(demo(), tmp_path / "run")
    disk = "\n".join(plan.facts["disk"])
    for part in ("eval base GGUF (f16)", "4-bit checkpoint", "adapter and checkpoints", "merged checkpoint", "GGUF Q4_K_M"):
        assert part in disk
    weights = 134_515_008  # SmolLM2-135M
    sizes = {"weights": weights, "embeddings": 28_311_552, "adapter": 2_441_216, "architecture": "LlamaForCausalLM"}
    only_export = preflight.estimated_outputs(demo(), sizes, ["05_gguf_export"], cpu_eval_gguf=False)
    assert only_export["merged checkpoint"] == 4 * weights  # fp32 merge on a CPU
    assert only_export["GGUF F16"] == 2 * weights and only_export["GGUF Q8_0"] == int(weights * 8.5 / 8)
    total = sum(preflight.estimated_outputs(demo(), sizes, list(preflight.OPTIONAL_STAGES) + ["05_gguf_export"], True).values())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=int(total * 0.5)))
    assert any("not enough disk space" in p for p in plan_for(demo(), tmp_path / "run").problems)


def test_hub_dataset_ids_must_be_cached_or_reachable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = recipe.DatasetSource(path="FreedomIntelligence/medical-o1-reasoning-SFT", config="en")
    with pytest.raises(MedcotError, match="neither in the local Hugging Face cache nor reachable \\(HF_HUB_OFFLINE is set\\)"):
        preflight.hub_dataset_available(source)
    (tmp_path / "hub" / "datasets--FreedomIntelligence--medical-o1-reasoning-SFT").mkdir(parents=True)
    assert preflight.hub_dataset_available(source) == "in the local Hugging Face cache"


def test_validate_checks_gguf_types_against_the_installed_llama_cpp(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text(Path("params/cpu-demo.yaml").read_text().replace("Q8_0", "Q9_0"))
    assert cli.main(["validate", str(bad)]) == 2
    assert "gguf_quant_types: ['Q9_0'] are not llama.cpp quantization types" in capsys.readouterr().err


def test_a_corrupt_or_older_manifest_is_refused_with_what_to_do(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"status": "running", "stages": {')
    code, _, err = run_cli(capsys, "params/cpu-demo.yaml", "--run-dir", run_dir)
    assert code == 2 and "manifest.json, line 1: the manifest is corrupt" in err and "pass --overwrite" in err
    old = {"status": "running", "params_hash": "x", "stages": {}, "versions": {"medcot": "0.0.9"}}
    (run_dir / "manifest.json").write_text(json.dumps(old))
    code, _, err = run_cli(capsys, "params/cpu-demo.yaml", "--run-dir", run_dir)
    assert code == 2 and "was written by medcot 0.0.9 (manifest schema none)" in err and "pass --overwrite" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json"], "nothing else was written"


def test_adapter_count_covers_all_linear_layers_when_no_layers_are_named():
    """all-linear on every layer is twice the demo's adapter on the upper 15 of 30 layers (it was counted as 0)."""
    demo = recipe.load("params/cpu-demo.yaml")
    model = preflight.meta_model(preflight.model_config(demo.model_name_or_path, False))
    every_layer = recipe.load("params/cpu-demo.yaml", overrides={"layers_to_transform": None})
    assert preflight.adapter_parameters(every_layer, model) == 2 * preflight.adapter_parameters(demo, model) > 0
