"""The benchmark's method (alternation, statistics, fits), its README table, and a tiny run of the command.

A benchmark is not a test: only `--quick` runs here, to check that the command works and writes its results.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from medcot_lib import bench, cli
from medcot_lib.errors import MedcotError


def test_sides_alternate_after_one_discarded_warmup():
    calls = []
    sides = {name: (lambda name=name: calls.append(name) or {"seconds": len(calls)}) for name in ("A", "B")}
    runs = bench.alternate(sides, repeats=3)
    assert calls == ["A", "B"] * 4  # warm-up pair first, then A B three times
    assert [r["seconds"] for r in runs["A"]] == [3, 5, 7] and [r["seconds"] for r in runs["B"]] == [4, 6, 8]
    calls.clear()
    bench.alternate(sides, repeats=2, warmup=False)
    assert calls == ["A", "B", "A", "B"]


def test_summary_is_median_and_min_max():
    assert bench.summary([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench.summary([None]) is None
    assert bench.summarize([{"s": 1.0, "ok": True, "error": "x"}, {"s": 3.0}]) == {"s": {"median": 2.0, "min": 1.0, "max": 3.0, "n": 2}}


def test_ratio_of_medians_with_paired_range():
    r = bench.ratio([4.0, 6.0, 5.0], [2.0, 2.0, 1.0])
    assert r == {"median": 2.5, "min": 2.0, "max": 5.0, "n": 3}  # 5 / 2; per repetition 2, 3 and 5
    assert bench.ratio([4.0, None], [2.0, 1.0])["n"] == 1  # a failed run drops its pair
    assert bench.ratio([None], [1.0]) is None


def test_power_law_fit_recovers_an_exact_exponent():
    x = [16, 32, 64, 128]
    fit = bench.fit_power_law(x, [3.0 * v**1.7 for v in x])
    assert fit["exponent"] == pytest.approx(1.7, abs=1e-9) and fit["coefficient"] == pytest.approx(3.0)
    assert fit["r2"] == pytest.approx(1.0)


def test_targets_are_judged_on_the_median():
    measured = {"median": 1.6, "min": 1.2, "max": 1.9}
    assert bench.target("speed", measured, ">=", 1.5, "x")["met"]
    assert not bench.target("seconds", 61.0, "<=", 60.0, " s")["met"]
    assert not bench.target("missing", None, ">=", 1.0)["met"]


def test_real_lengths_follow_the_measured_distribution():
    lengths = sorted(bench.real_lengths(2000))
    assert lengths[1000] == pytest.approx(bench.REAL_MEDIAN, abs=3)
    assert lengths[100] == pytest.approx(bench.REAL_P5, abs=3) and lengths[1900] == pytest.approx(bench.REAL_P95, abs=3)
    assert max(lengths) <= bench.REAL_MAX


def test_padding_share_counts_pad_tokens_per_batch():
    assert bench.padding_share([2, 4, 3, 3], batch_size=2) == pytest.approx(1 - 12 / 14)


def test_benchmark_names():
    assert bench.expand(None) == list(bench.ALL) == bench.expand(["all"]) and "gpu" not in bench.ALL
    assert bench.expand(["gpu", "all"]) == [*bench.ALL, "gpu"]
    assert bench.expand(["scaling", "train"]) == ["train", "scaling"]
    with pytest.raises(MedcotError, match="unknown benchmark"):
        bench.expand(["trian"])


def _result(name: str, quick: bool) -> dict:
    env = {"cpu_model": "Test CPU", "hardware": {"cpu_count": 2}, "torch_threads": 2, "gpu": {"present": False}}
    return {"schema": bench.SCHEMA, "benchmark": name, "quick": quick, "created": "2026-01-02T03:04:05+00:00",
            "command": f"medcot bench {name} --repeats 3", "environment": env,
            "targets": [bench.target(f"{name}: speed-up", {"median": 1.75, "min": 1.5, "max": 2.0}, ">=", 1.5, "x")]}


def test_readme_table_round_trip(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{bench.DEMO_START}\nold demo\n{bench.DEMO_END}\n\n## Performance\n\n"
                      f"{bench.README_START}\nold\n{bench.README_END}\n\nafter\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "train.json").write_text(json.dumps(_result("train", quick=True)))
    assert bench.readme_table(tmp_path / "bench") == bench.NOT_MEASURED  # quick results are never the figures
    (tmp_path / "bench" / "generate.json").write_text(json.dumps(_result("generate", quick=False)))
    scaling = _result("scaling", quick=False) | {"targets": [], "fits": {"examples": {"x": "examples", "exponent": 1.02, "r2": 0.999}}}
    (tmp_path / "bench" / "scaling.json").write_text(json.dumps(scaling))
    table = bench.readme_table(tmp_path / "bench")
    assert "generate: speed-up" in table and "1.75x (1.5–2)" in table and "`train`" not in table
    assert "scaling: training time ∝ examples^k" in table and "k = 1.02" in table
    bench.update_readme(readme, tmp_path / "bench")
    text = readme.read_text()
    assert text.startswith("# x\n") and text.endswith(f"{bench.README_END}\n\nafter\n")
    assert "old demo" not in text and "_Not measured yet._" in text  # no pipeline result: the demo block says so
    assert text.split(bench.README_START)[1].split(bench.README_END)[0].strip() == table
    bench.update_readme(readme, tmp_path / "bench")
    assert readme.read_text() == text  # rewriting is idempotent


def test_project_readme_has_the_blocks():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert text.index(bench.README_START) < text.index(bench.README_END)
    assert text.index(bench.DEMO_START) < text.index(bench.DEMO_END)


def _ci(value, low, high, n=20):
    return {"value": value, "low": low, "high": high, "n": n}


def _pipeline_result(quick: bool = False) -> dict:
    effect = {"sets": {"medqa": {"n": 20, "kind": "mcq", "headline": "accuracy",
                                 "format_compliance": {"base": _ci(0.0, 0.0, 0.0), "fine-tuned": _ci(0.9, 0.75, 1.0)},
                                 "format_difference": {"difference": 0.9, "p_value": 3.8e-6, "test": "mcnemar-exact"},
                                 "accuracy": {"base": _ci(0.25, 0.05, 0.45), "fine-tuned": _ci(0.3, 0.1, 0.5)},
                                 "headline_difference": {"difference": 0.05, "p_value": 1.0}}},
              "log_history": [{"step": 1, "loss": 2.5}, {"step": 10, "eval_loss": 1.2}], "examples": [
                  {"set": "medqa", "question": "Which drug?", "gold": "B", "base": "Maybe aspirin.",
                   "fine-tuned": "<think>\nIt is B.\n</think>\n\nThe answer is (B) Heparin."}]}
    run = {"seconds": 600.0, "peak_rss_gb": 4.0, "format fine-tuned medqa": 0.9, "demo": effect}
    return {**_result("pipeline", quick), "sides": {"cpu-demo": [run]}, "settings": {"materialisation_s": 21.4},
            "summary": {"cpu-demo": {"seconds": {"median": 600.0, "min": 590.0, "max": 610.0, "n": 3}}}}


def test_demo_section_is_built_from_the_pipeline_result(tmp_path):
    (tmp_path / "pipeline.json").write_text(json.dumps(_pipeline_result(quick=True)))
    assert bench.demo_section(tmp_path).startswith("_Not measured yet._")  # quick runs are never shown as figures
    (tmp_path / "pipeline.json").write_text(json.dumps(_pipeline_result()))
    section = bench.demo_section(tmp_path)
    assert "| medqa | 20 |" in re.sub(" +", " ", section) and "0% [0%, 0%]" in section and "90% [75%, 100%]" in section
    assert "3.8e-06" in section and "0.25 → 0.30 (p 1)" in section
    assert "600 s (590–610) over 3 runs, plus 21 s once per machine" in section and "results/bench/pipeline.png" in section
    assert "The answer is (B) Heparin." in section and "Maybe aspirin." in section


def test_readme_without_markers_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("no block\n")
    with pytest.raises(MedcotError, match="bench:start"):
        bench.update_readme(tmp_path / "README.md", tmp_path)


REQUIRED = {"schema", "benchmark", "quick", "command", "created", "repeats", "method", "environment", "settings", "sides",
            "summary", "targets", "met", "history"}


@pytest.mark.integration
def test_quick_bench_writes_results(tmp_path, capsys):
    assert cli.main(["bench", "train", "generate", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert "QUICK" in capsys.readouterr().out
    for name in ("train", "generate"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert REQUIRED <= set(result) and result["quick"] is True and result["benchmark"] == name
        assert {"versions", "hardware", "cpu_model", "torch_threads", "gpu"} <= set(result["environment"])
        assert all({"figure", "target", "value", "met"} <= set(t) for t in result["targets"]) and result["targets"]
        for side, runs in result["sides"].items():
            assert len(runs) == 1 and "error" not in runs[0], side
            assert math.isfinite(result["summary"][side]["tokens_per_s"]["median"])
    train = json.loads((tmp_path / "train.json").read_text())
    assert {"qlora", "profile", "padding_percent", "ratios"} <= set(train)
    assert train["qlora"]["model_footprint_gb"]["qlora"] < train["qlora"]["model_footprint_gb"]["lora"]
    assert train["settings"]["trainer"].startswith("MedcotSFTTrainer")  # the real trainer, with its loss
    assert (tmp_path / "generate.png").stat().st_size > 0
    assert bench.readme_table(tmp_path) == bench.NOT_MEASURED


@pytest.mark.integration
def test_quick_sweep_trains_and_scores_each_point_on_the_val_split(tmp_path):
    result = bench.run(["sweep"], repeats=1, quick=True, out_dir=tmp_path, echo=lambda *_: None)["sweep"]
    assert list(result["sides"]) == [bench._point_name(p) for p in bench.SWEEP_POINTS[:2]]
    for point, (run,) in result["sides"].items():
        assert "error" not in run, point
        assert run["val_n"] == result["settings"]["data"]["val"] and 0 <= run["val_format_compliance"] <= 1
        assert run["train_s"] > 0 and run["eval_loss_first"] > 0
    table = bench.sweep_table(result)
    assert table.count("(**the demo recipe**)") == 1  # the recipe ships one of the measured settings


@pytest.mark.integration
def test_gpu_bench_runs_every_seed_recipe_at_its_tiny_shape_on_a_cpu(tmp_path, monkeypatch):
    """The code `medcot bench gpu` runs at full shapes on a GPU, here at tiny shapes: it cannot rot unseen."""
    monkeypatch.delenv("MEDCOT_BENCH_GPU_BUDGET_S", raising=False)
    result = bench.run(["gpu"], repeats=1, quick=True, out_dir=tmp_path, echo=lambda *_: None)["gpu"]
    assert REQUIRED <= set(result) and list(result["recipes"]) == list(bench.GPU_RECIPES)
    for name, details in result["recipes"].items():
        assert "error" not in details, (name, details)
        assert details["model"].startswith("random:") and details["model"].endswith(":tiny")
        assert details["loss_falls"] and len(details["losses"]) == 2, (name, details["losses"])
        assert details["generation"]["hf"]["new_tokens"] > 0 and "vllm" in details["generation"]
        (run,) = result["sides"][name]
        assert run["tokens_per_s"] > 0 and run["peak_memory_gb"] > 0 and run["step_s"] > 0
    qwen3 = result["recipes"]["qwen3-8b-qlora"]
    assert qwen3["settings"]["load_in_4bit"] and qwen3["parameters"]["trainable"] > 0
    if not torch.cuda.is_available():
        assert "optim: 'paged_adamw_8bit' -> 'adamw_torch'" in qwen3["mapped"]
        assert "backend: 'unsloth' -> 'hf'" in result["recipes"]["deepseek-r1-distill-llama-8b-unsloth"]["mapped"]
    assert result["recipes"]["llama31-8b-hematology-dora"]["settings"]["use_dora"]
    assert all(t["met"] for t in result["targets"]) and len(result["targets"]) == 5


def test_a_time_budget_skips_the_remaining_recipes(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCOT_BENCH_GPU_BUDGET_S", "-1")  # spent before the first recipe
    body = bench.BENCHES["gpu"](bench.QUICK, 1)
    assert all(r["skipped"].startswith("time budget of -1 s") for r in body["recipes"].values()) and not body["sides"]


def test_the_gpu_bench_logs_nowhere_whatever_the_recipe_reports_to():
    """A recipe's W&B or TensorBoard logging would need its package (and a key) on the bench machine, for nothing."""
    from medcot_lib.bench import gpu_shapes

    for name in bench.GPU_RECIPES:
        cfg, _ = gpu_shapes.shaped_recipe(Path("params") / f"{name}.yaml", tiny=True)
        assert cfg.report_to == [], name


def test_each_recipe_prints_its_figures_as_it_finishes():
    from medcot_lib.bench import gpu_shapes

    runs = [{"tokens_per_s": t, "mfu": t / 1e4, "peak_memory_gb": 20.0} for t in (900.0, 1000.0, 1100.0)]
    details = {"load_s": 41.0, "losses": [10.8, 10.1], "generation": {"hf": {"tokens_per_s": 212.0}}}
    line = gpu_shapes.progress_line("qwen3-8b-qlora", runs, details, 95.0)
    assert line == ("[bench gpu]    95 s  qwen3-8b-qlora: load 41 s, 1,000 tokens/s, MFU 10.0%, peak 20.0 GB, "
                    "losses 10.800 10.100, HF generation 212 tokens/s")
    failed = gpu_shapes.progress_line("llama31-8b-hematology-dora", [], {"error": "OutOfMemoryError: CUDA"}, 200.0)
    assert failed.endswith("llama31-8b-hematology-dora: OutOfMemoryError: CUDA")
