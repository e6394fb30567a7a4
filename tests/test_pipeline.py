"""The runner, end to end: the real CPU demo, executed by papermill on the embedded model and the bundled data.

The demo runs once per test session with the recipe exactly as shipped (the `finished_run` fixture in conftest.py,
shared with tests/test_chat.py), so these tests check learning (issue 12: the
fine-tuned model writes the reasoning format, significantly more often than the base) as well as the plumbing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def medcot(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "medcot_lib", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"medcot {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def demo_recipe():
    from medcot_lib import recipe

    return recipe.load("params/cpu-demo.yaml")


def test_the_fine_tuned_model_has_learned_the_reasoning_format(finished_run):
    run_dir, _ = finished_run
    sets = json.loads((run_dir / "eval/metrics.json").read_text())["sets"]
    for name in ("heldout", "medqa"):
        base, tuned = sets[name]["base"]["format_compliance"], sets[name]["fine-tuned"]["format_compliance"]
        difference = sets[name]["difference"]["format_compliance"]
        assert tuned["value"] >= 0.8, f"{name}: fine-tuned format compliance {tuned}"
        assert base["value"] <= 0.2, f"{name}: base format compliance {base}"
        assert difference["test"] == "mcnemar-exact" and difference["p_value"] < 0.01, f"{name}: {difference}"


def test_training_and_validation_loss_fall(finished_run):
    run_dir, _ = finished_run
    history = json.loads((run_dir / "adapter/trainer_state.json").read_text())["log_history"]
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) >= 3 and evals == sorted(evals, reverse=True) and evals[-1] < evals[0] - 0.05
    first, last = sum(train[:4]) / 4, sum(train[-4:]) / 4
    assert last < first - 0.1, f"mean train loss of the first 4 steps {first:.3f}, of the last 4 {last:.3f}"


def test_executed_notebooks_hold_no_warnings_or_stray_logs(finished_run):
    run_dir, _ = finished_run
    for notebook in sorted(run_dir.glob("*.ipynb")):
        for cell in json.loads(notebook.read_text())["cells"]:
            for output in cell.get("outputs", []):
                text = "".join(output.get("text", ""))
                assert output.get("name") != "stderr" or not text.strip(), f"{notebook.name}: stderr output {text[:300]!r}"
                assert "Warning" not in text and "IProgress" not in text, f"{notebook.name}: {text[:300]!r}"


def test_every_stage_writes_its_outputs_and_the_manifest(finished_run, demo_recipe):
    run_dir, result = finished_run
    stages = sorted(p.stem for p in Path("notebooks").glob("[0-9][0-9]*_*.ipynb"))
    for number, stage in enumerate(stages, start=1):
        outcome = "skipped (chat_demo is false)" if stage == "06_chat_demo" else "done in"
        assert f"[{number}/{len(stages)}] {stage}: {outcome}" in result.stdout
    for name in ["01_baseline.ipynb", "generations/01_baseline.jsonl", "metrics/01_baseline.json", "figures/01_new_tokens.png",
                 "02_quantize.ipynb", "quantized/config.json", "metrics/02_quantize.json", "figures/02_memory.png",
                 "03_qlora_train.ipynb", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "figures/03_loss.png", "metrics/03_qlora_train.json","00_dataset_inspection.ipynb", "data/train.jsonl", "data/val.jsonl", "data/test.jsonl",
                 "data/eval/medqa.jsonl", "data/eval/pubmedqa.jsonl", "data/report.json",
                 "figures/00_token_lengths.png", "metrics/00_dataset_inspection.json"]:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*partial*")) and not list(run_dir.glob("*.failed.ipynb"))
    metrics = json.loads((run_dir / "metrics/00_dataset_inspection.json").read_text())
    assert sum(metrics["splits"].values()) >= 180 and metrics["eval_sets"]["pubmedqa"] == 22
    assert metrics["token_lengths"]["recommended_max_length"] % 64 == 0
    assert metrics["generation_budget"]["target_tokens"]["p95"] <= demo_recipe.max_new_tokens  # trained answers fit
    baseline = json.loads((run_dir / "metrics/01_baseline.json").read_text())
    assert baseline["n"] == metrics["splits"]["test"] + 5 and baseline["new_tokens"]["max"] <= demo_recipe.max_new_tokens
    assert baseline["backend"] == "llamacpp"  # auto, on a CPU with the gguf extra
    assert json.loads((run_dir / "metrics/02_quantize.json").read_text())["reload_identical"] is True
    trained = json.loads((run_dir / "metrics/03_qlora_train.json").read_text())
    assert trained["global_step"] == demo_recipe.max_steps and trained["eval_loss_last"] > 0 and trained["tokens_per_s"] > 0
    assert 0 < trained["parameters"]["percent"] < 10
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["parameters"]["max_steps"] == demo_recipe.max_steps
    assert manifest["versions"]["transformers"] and manifest["hardware"]["cpu_count"]
    assert manifest["data"].pop("run:distilled").startswith("written by stage 00b")
    assert set(manifest["data"]) >= {"bundled:medical-o1-concise", "bundled:medmcqa-converted"}
    assert all(v.startswith("sha256:") for v in manifest["data"].values())
    assert manifest["stages"].pop("06_chat_demo") == {"status": "skipped", "why": "chat_demo is false"}
    assert {s["status"] for s in manifest["stages"].values()} == {"done"} and len(manifest["stages"]) == len(stages) - 1


def test_stage_00b_distils_and_stage_05_exports_in_the_full_run(finished_run):
    run_dir, _ = finished_run
    for name in ["00b_teacher_cot.ipynb", "distill/cache.jsonl", "distill/distilled.json", "distill/stats.json",
                 "metrics/00b_teacher_cot.json", "05_gguf_export.ipynb", "export/merged/config.json",
                 "metrics/05_gguf_export.json"]:
        assert (run_dir / name).is_file(), name
    stats = json.loads((run_dir / "distill/stats.json").read_text())
    assert stats["questions"] == 6 and stats["teacher"].startswith("llamacpp:SmolLM2")
    cache = (run_dir / "distill/cache.jsonl").read_text().splitlines()
    assert 6 <= len(cache) <= 12  # one to two attempts per question, every generation kept
    exported = json.loads((run_dir / "metrics/05_gguf_export.json").read_text())
    assert not exported["flagged"] and len(exported["files"]) == 3  # the F16 file, Q4_K_M and Q8_0
    assert all(Path(path).is_file() for path in exported["files"].values())


def test_stage_04_scores_both_models_on_every_item_with_cis(finished_run):
    run_dir, _ = finished_run
    for name in ["04_adapter_eval.ipynb", "eval/generations.jsonl", "eval/metrics.json", "eval/report.md",
                 "eval/side_by_side.md", "eval/side_by_side.html", "figures/04_accuracy.png", "figures/04_reasoning_tokens.png",
                 "figures/04_loss.png", "metrics/04_adapter_eval.json"]:
        assert (run_dir / name).is_file(), name
    sets = json.loads((run_dir / "eval/metrics.json").read_text())["sets"]
    held_out = json.loads((run_dir / "metrics/00_dataset_inspection.json").read_text())["splits"]["test"]
    assert {k: v["n"] for k, v in sets.items()} == {"medqa": 20, "pubmedqa": 12, "heldout": held_out}
    rows = [json.loads(line) for line in (run_dir / "eval/generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (20 + 12 + held_out)  # nothing dropped, both models
    settings = json.loads((run_dir / "eval/metrics.json").read_text())["settings"]
    assert settings["backend"] == "llamacpp" and settings["base_generations_reused_from_01"] == held_out + 5
    for name, entry in sets.items():
        for model in ("base", "fine-tuned"):
            headline = entry[model][entry["headline"]]
            assert headline["low"] <= headline["value"] <= headline["high"] and headline["n"] == entry["n"]
            wrong = sum(r["status"] != "ok" for r in rows if r["set"] == name and r["model"] == model)
            if entry["kind"] != "open":
                assert entry[model]["extraction_failure_rate"]["value"] == pytest.approx(wrong / entry["n"])
    assert sets["medqa"]["difference"]["accuracy"]["test"] == "mcnemar-exact"
    board = (run_dir.parent / "leaderboard.csv").read_text().splitlines()
    assert sum(line.startswith("cpu-demo,") for line in board) == 3  # one headline row per eval set


def test_stage_04_rerun_with_greedy_decoding_gives_identical_metrics(finished_run, demo_recipe):
    from medcot_lib import evaluate

    run_dir, _ = finished_run
    # Every set, as stage 04 ran them: llama.cpp decodes sequences together, so the batch must be the same one.
    sets = evaluate.load_eval_sets(demo_recipe, run_dir)
    generations = evaluate.generate_both(demo_recipe, run_dir, sets, progress=False)
    summary = evaluate.summarise(sets, evaluate.score_all(sets, generations), demo_recipe.bootstrap_resamples)
    assert summary == json.loads((run_dir / "eval/metrics.json").read_text())["sets"]


def test_executed_notebook_carries_outputs_and_the_injected_recipe(finished_run):
    run_dir, _ = finished_run
    nb = json.loads((run_dir / "00_dataset_inspection.ipynb").read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "max_steps = " in "".join(injected[0]["source"])
    assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


def test_a_finished_run_is_not_overwritten(finished_run):
    run_dir, _ = finished_run
    before = (run_dir / "manifest.json").read_text()
    result = medcot("run", "params/cpu-demo.yaml", "--run-dir", run_dir, check=False)
    assert result.returncode == 2 and "holds a finished run; pass --overwrite" in result.stderr
    assert (run_dir / "manifest.json").read_text() == before


def test_an_interrupted_run_resumes_and_changed_parameters_are_refused(finished_run):
    run_dir, _ = finished_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["status"] = "running"  # as if killed after stage 00 finished
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    result = medcot("run", "params/cpu-demo.yaml", "--run-dir", run_dir)
    assert "already done, skipped (resuming)" in result.stdout
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "finished"
    manifest["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    result = medcot("run", "params/cpu-demo.yaml", "--run-dir", run_dir, "-p", "seed", "8", check=False)
    assert result.returncode == 2 and "unfinished run with different parameters" in result.stderr


def test_bad_recipe_fails_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "bad"
    result = medcot("run", "params/cpu-demo.yaml", "--run-dir", run_dir, "-p", "lora_rr", "8", check=False)
    assert result.returncode == 2 and "lora_rr: unknown key" in result.stderr
    assert not run_dir.exists()


def test_failing_stage_keeps_its_traceback_and_nothing_half_written(tmp_path):
    # Training on an eval set passes pre-flight (which does not decontaminate) and then empties stage 00's training set.
    run_dir = tmp_path / "fail"
    result = medcot("run", "params/cpu-demo.yaml", "--run-dir", run_dir, "-p", "dataset_mixture", "[{path: bundled:medqa}]",
                    "-p", "min_cot_chars", "0", check=False)
    assert result.returncode == 2
    assert ("stage 00_dataset_inspection failed: MedcotError: no training items are left: the decontaminate step "
            "(setting `decontamination_chars=64`)") in result.stderr
    assert (run_dir / "00_dataset_inspection.failed.ipynb").is_file()
    assert not (run_dir / "data").exists() and not list(run_dir.glob(".*partial*"))
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"


def test_unknown_stage_is_named(tmp_path):
    result = medcot("run", "params/cpu-demo.yaml", "--run-dir", tmp_path / "x", "--stages", "09", check=False)
    assert result.returncode == 2 and "no stage '09' (available: 00_dataset_inspection" in result.stderr


def test_papermill_runs_the_notebook_directly_with_the_recipe_file(tmp_path):
    out = tmp_path / "nb.ipynb"
    subprocess.run([sys.executable, "-m", "papermill", "notebooks/00_dataset_inspection.ipynb", str(out),
                    "-f", "params/cpu-demo.yaml", "-p", "run_dir", str(tmp_path / "direct"), "-p", "val_size", "5",
                    "--cwd", "notebooks", "--no-progress-bar"], check=True, capture_output=True)
    metrics = json.loads((tmp_path / "direct/metrics/00_dataset_inspection.json").read_text())
    assert metrics["splits"]["val"] == 5


def test_validate_command_reports_each_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\n")
    result = medcot("validate", "params/cpu-demo.yaml", bad, check=False)
    assert result.returncode == 2
    assert "params/cpu-demo.yaml: ok" in result.stdout and "run_name: required key is missing" in result.stderr


def test_help_notebook_documents_every_knob():
    result = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", "notebooks/00_dataset_inspection.ipynb"],
                            capture_output=True, text=True, check=True)
    for knob in ("dataset_mixture", "decontamination_chars", "prompt_style", "max_length"):
        assert knob in result.stdout
    assert Path("notebooks/00_dataset_inspection.ipynb").is_file()
