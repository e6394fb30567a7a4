"""`medcot sweep`: the sweep file's checks (each error names file, key and line), point names and collisions, skipping
finished points, the ETA, seed aggregation and paired differences; then real sweeps of the CPU demo recipe."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medcot_lib import __version__, cli, pipeline, sweep
from medcot_lib.errors import MedcotError
from medcot_lib.sweep import runner

DEMO = Path("params/cpu-demo.yaml").resolve()


@pytest.fixture
def sweep_file(tmp_path):
    """Write a sweep file on the CPU demo recipe and return its path."""

    def _write(body: str, name: str = "s.yaml", encoding: str = "utf-8") -> Path:
        path = tmp_path / name
        path.write_text(f"recipe: {DEMO}\n" + body, encoding=encoding)
        return path

    return _write


def load(path: Path, tmp_path: Path) -> sweep.Sweep:
    return sweep.load(path, tmp_path / "results")


# --------------------------------------------------------------------------- the sweep file


def test_grid_times_points_with_fixed_values_and_defaults(sweep_file, tmp_path):
    s = load(sweep_file("grid:\n  lora_r: [4, 8]\n  seed: [1, 2]\npoints:\n  - {learning_rate: 1.0e-3}\n"
                        "  - {learning_rate: 2.0e-3}\nfixed: {max_steps: 2}\nstages: [00, 03, \"04\"]\n"), tmp_path)
    assert s.name == "s" and s.stages == ["00", "03", "04"] and not s.smoke
    assert len(s.points) == 8 and s.swept_keys == ["learning_rate", "lora_r", "seed"]
    assert s.points[0].name == "learning_rate=0.001,lora_r=4,seed=1"
    assert s.points[0].overrides == {"max_steps": 2, "learning_rate": 0.001, "lora_r": 4, "seed": 1}
    assert s.points[-1].run_dir == tmp_path / "results" / "sweeps" / "s" / "learning_rate=0.002,lora_r=8,seed=2"


def test_the_shipped_sweep_is_the_demo_over_three_ranks_and_two_seeds():
    s = sweep.load("params/sweeps/cpu-demo-rank.yaml", Path("results"))
    assert s.recipe == Path("params/cpu-demo.yaml") and len(s.points) == 6
    assert [p.swept for p in s.points[:2]] == [{"lora_r": 4, "seed": 1}, {"lora_r": 4, "seed": 2}]


BAD = [
    ("typo: 1\ngrid: {seed: [1]}\n", r"s\.yaml, line 2, field 'typo': unknown sweep key 'typo'"),
    ("grid:\n  seed: [1]\n  lora_rr: [4]\n", r"s\.yaml, line 4, field 'lora_rr': unknown recipe parameter 'lora_rr' in grid; did you mean lora_r"),
    ("points:\n  - {seed: 1}\n  - {sed: 2}\n", r"s\.yaml, line 4, field 'sed': unknown recipe parameter 'sed' in points"),
    ("grid: {seed: [1]}\nfixed:\n  gradient_checkpointing: true\n", r"s\.yaml, line 4, field 'gradient_checkpointing'.*renamed activation_checkpointing"),
    ("grid: {}\n", r"s\.yaml, line 2, field 'grid': the grid is empty"),
    ("grid:\n  seed: []\n", r"s\.yaml, line 3, field 'seed': grid key 'seed' needs a non-empty list"),
    ("name: x\n", r"s\.yaml, line 1: the sweep has neither grid nor points"),
    ("grid:\n  lora_r: [8, 0]\n", r"s\.yaml: point \{lora_r: 0\} on .*cpu-demo\.yaml: invalid recipe\n  lora_r: Input should be greater than 0"),
    ("grid:\n  learning_rate: [1e-4, 0.0001]\n",
     r"points \{learning_rate: \"1e-4\"\} and \{learning_rate: 0.0001\} resolve to the same run directory .*learning_rate=0.0001"),
    ("points:\n  - {seed: 1}\n  - {seed: 1}\n", r"points \{seed: 1\} and \{seed: 1\} resolve to the same run directory"),
    ("grid: {seed: [1]}\npoints:\n  - {seed: 2}\n", r"s\.yaml, line 4, field 'seed': point 0 sets seed, which the grid sweeps too"),
    ("grid:\n  seed: [1, 2\n", r"s\.yaml, line 3: not valid YAML"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_each_bad_sweep_file_is_an_error_naming_file_key_and_line(sweep_file, tmp_path, body, message):
    with pytest.raises(MedcotError, match=message):
        load(sweep_file(body), tmp_path)
    assert not (tmp_path / "results").exists()


def test_a_missing_recipe_and_a_non_utf8_file_are_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("grid: {seed: [1]}\nrecipe: nowhere.yaml\n")
    with pytest.raises(MedcotError, match=r"s\.yaml, line 2, field 'recipe': recipe file not found: .*nowhere\.yaml"):
        load(path, tmp_path)
    path.write_bytes(b"recipe: x.yaml\ngrid:\n  seed: [1]  # caf\xe9\n")
    with pytest.raises(MedcotError, match=r"s\.yaml, line 3, field 'seed': not valid UTF-8"):
        load(path, tmp_path)


def test_the_cli_prints_the_error_exits_2_and_writes_nothing(sweep_file, tmp_path, capsys):
    code = cli.main(["sweep", str(sweep_file("grid: {lora_rr: [1]}\n")), "--results", str(tmp_path / "results")])
    assert code == 2 and "medcot: error:" in capsys.readouterr().err and not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- names


def test_point_names_are_short_readable_and_filesystem_safe():
    assert sweep.point_name({"lora_r": 8, "learning_rate": 0.0001, "seed": 1}) == "lora_r=8,learning_rate=0.0001,seed=1"
    assert sweep.value_text(list(range(15, 30))) == "15..29(15)" and sweep.value_text(["q_proj", "v_proj"]) == "q_proj+v_proj"
    assert sweep.value_text([{"path": "bundled:medqa", "weight": 0.5}, {"path": "org/data", "name": None}]) == "medqa@0.5+data"
    assert sweep.value_text(True) == "true" and sweep.value_text(None) == "none"
    assert sweep.point_name({"system_prompt": "Think / answer: (X)?"}) == "system_prompt=Think-answer-X-"
    long = sweep.point_name({"system_prompt": "x" * 300})
    assert len(long) <= 96 and "~" in long and long == sweep.point_name({"system_prompt": "x" * 300})
    assert long != sweep.point_name({"system_prompt": "x" * 299})


# --------------------------------------------------------------------------- running


def fake_finished_run(run_dir: Path, params_hash: str, stages: list[str], status: str = "partial") -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({
        "manifest_schema": pipeline.MANIFEST_SCHEMA, "versions": {"medcot": __version__}, "status": status,
        "params_hash": params_hash, "stages": {s: {"status": "done"} for s in stages}}))


def test_finished_points_are_skipped_without_a_subprocess(sweep_file, tmp_path, monkeypatch):
    s = load(sweep_file("grid: {seed: [1, 2]}\nstages: [\"00\"]\n"), tmp_path)
    stages = sweep.stage_names(s, Path("notebooks"))
    for point in s.points:
        fake_finished_run(point.run_dir, runner.expected_hash(s, point), stages)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a finished point was started"))
    lines = []
    state = sweep.run(s, parallel=1, notebooks_dir=Path("notebooks"), echo=lines.append)
    assert {p["status"] for p in state.points.values()} == {"skipped"} and "2 already finished (skipped), 0 to run" in lines[0]
    saved = json.loads((s.root / "sweep.json").read_text())
    assert [p["status"] for p in saved["points"]] == ["skipped", "skipped"] and saved["points"][0]["overrides"] == {"seed": 1}


def test_a_run_is_finished_only_with_every_stage_done_and_the_same_parameters(tmp_path):
    fake_finished_run(tmp_path / "a", "h1", ["00_dataset_inspection"])
    assert sweep.is_finished(tmp_path / "a", ["00_dataset_inspection"], "h1")
    assert not sweep.is_finished(tmp_path / "a", ["00_dataset_inspection"], "h2")  # the sweep's values changed
    assert not sweep.is_finished(tmp_path / "a", ["00_dataset_inspection", "03_qlora_train"], "h1")  # interrupted
    assert not sweep.is_finished(tmp_path / "absent", ["00_dataset_inspection"], "h1")
    (tmp_path / "a" / "manifest.json").write_text("{")  # corrupt: `medcot run` explains it when the point runs
    assert not sweep.is_finished(tmp_path / "a", ["00_dataset_inspection"], "h1")


def test_each_point_is_medcot_run_with_its_overrides(sweep_file, tmp_path):
    s = load(sweep_file("grid: {learning_rate: [1.0e-5]}\nfixed: {eval_datasets: []}\nstages: [\"03\"]\nsmoke: true\n"), tmp_path)
    args = runner.command(s, s.points[0])
    assert args[1:5] == ["-m", "medcot_lib", "run", str(DEMO)] and args[-3:] == ["--stages", "03", "--smoke"]
    assert args[args.index("--run-dir") + 1] == str(s.points[0].run_dir)
    assert "-p eval_datasets [] -p learning_rate 1e-05" in " ".join(args)


def test_parallel_slots_get_a_gpu_each_or_a_share_of_the_cores():
    assert sweep.slot_environments(2, ["3", "5"], 16) == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    with pytest.raises(MedcotError, match=r"--parallel 3: this machine has 2 CUDA GPU\(s\)"):
        sweep.slot_environments(3, ["0", "1"], 16)
    assert sweep.slot_environments(2, [], 2) == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 2
    assert sweep.slot_environments(3, [], 2)[0]["OMP_NUM_THREADS"] == "1"  # at least one thread


def test_the_eta_is_the_mean_finished_time_times_the_points_left_over_the_slots():
    assert sweep.eta_seconds([], 5, 1) is None
    assert sweep.eta_seconds([10.0, 20.0], 4, 1) == 60.0 and sweep.eta_seconds([10.0, 20.0], 4, 2) == 30.0
    assert runner._clock(3725) == "1h02m" and runner._clock(65) == "1m05s"


def test_the_error_line_of_a_failed_point_is_the_runners(tmp_path):
    log = tmp_path / "p.log"
    log.write_text("[1/1] 00 ...\nTraceback\nValueError: inner\nmedcot: error: stage 00 failed: boom\n  notebook: x\nrun over\n")
    assert runner.last_error_line(log) == "medcot: error: stage 00 failed: boom notebook: x"
    log.write_text("Traceback\nValueError: inner\nKilled\n")
    assert runner.last_error_line(log) == "ValueError: inner"


# --------------------------------------------------------------------------- summary statistics


def test_seed_aggregation_is_a_t_interval_across_seeds(sweep_file, tmp_path):
    s = load(sweep_file("grid:\n  lora_r: [4, 8]\n  seed: [1, 2, 3]\n"), tmp_path)
    acc = [0.5, 0.7, 0.6, 0.2, 0.2, 0.2]
    found = {p.name: {"medqa accuracy": {"value": a, "low": a - 0.1, "high": a + 0.1, "n": 20}}
             for p, a in zip(s.points, acc, strict=True)}
    del found[s.points[5].name]  # an unfinished seed
    rows = sweep.seed_groups(s, found)
    assert [(r["group"], r["seeds (n)"]) for r in rows] == [("lora_r=4", 3), ("lora_r=8", 2)]
    # mean 0.6, sd 0.1, t(2) = 4.303: 0.6 ± 4.303 × 0.1 / √3 = 0.6 ± 0.248
    assert rows[0]["medqa accuracy"] == "0.600 [0.352, 0.848] (n=3)"
    assert rows[1]["medqa accuracy"] == "0.200 [0.200, 0.200] (n=2)"
    assert sweep.t_interval([1.0]) is None and sweep.t_interval([1.0, 3.0])["high"] == pytest.approx(2 + 12.706)


def items(correct: dict[str, bool], gold: str = "A") -> dict:
    return {"medqa": {i: {"correct": c, "well_formed": True, "gold": gold} for i, c in correct.items()}}


def test_paired_differences_use_the_shared_items_and_say_how_many():
    reference = items({"a": False, "b": False, "c": True, "d": True})
    rows = sweep.paired_rows(reference, items({"a": True, "b": True, "c": True, "e": False}), "p2", resamples=200)
    accuracy = rows[0]
    assert accuracy["metric"] == "accuracy" and accuracy["shared items"] == "3 (of 4 / 4)"
    assert accuracy["difference"].startswith("+0.667") and "mcnemar" in accuracy["p"]
    assert accuracy["note"] == "on the shared items only" and rows[1]["metric"] == "format_compliance"
    skipped = sweep.paired_rows(reference, items({"x": True}), "p3")
    assert skipped[0]["shared items"] == "0 (of 4 / 1)" and skipped[0]["note"].startswith("skipped: no eval items in common")
    assert sweep.paired_rows(reference, items({"a": True}, gold="B"), "p4")[0]["note"].startswith("skipped")  # other gold


def test_a_partial_sweep_still_gets_a_summary(sweep_file, tmp_path):
    s = load(sweep_file("points:\n  - {seed: 1}\n  - {lora_r: 8}\n"), tmp_path)
    state = sweep.State(s)
    state.update(s.points[1], status="failed", exit_code=2, error="medcot: error: boom")
    text = sweep.write(s, state).read_text()
    assert "Educational and research use only" in text and "0 of 2 points finished, 1 failed, 1 not run" in text
    assert "skipped: the reference point seed=1 has not finished" in text and "medcot: error: boom" in text
    assert (s.root / "summary.csv").read_text().splitlines()[1:] == ["seed=1,pending,1,(recipe)", "lora_r=8,failed,(recipe),8"]


# --------------------------------------------------------------------------- real sweeps

# The cheapest real run of stages 00, 03 and 04 (04 needs 00's prepared data and 03's adapter; 01's base generations
# are optional, 04 makes them itself): a seeded random-weight model of Llama-3.2-1B's shape at tiny width (2 layers;
# its accuracy means nothing, only the machinery is under test), one optimizer step, 4 MedQA items, 8 new tokens, HF
# generation (no GGUF conversion). About 40 s a point on 2 cores.
TINY = {"model_name_or_path": "random:llama-3.2-1b:tiny", "layers_to_transform": None, "distillation": False,
        "dataset_mixture": [{"path": "bundled:medical-o1-concise"}], "max_steps": 1, "eval_steps": 1, "save_steps": 1,
        "eval_on_start": False, "per_device_train_batch_size": 2, "max_length": 256, "val_size": 4, "test_size": 4,
        "eval_test_split": False, "eval_datasets": [{"path": "bundled:medqa", "max_samples": 4}], "max_new_tokens": 8,
        "eval_backend": "hf", "bootstrap_resamples": 100, "eval_side_by_side": 0}


def medcot_sweep(path: Path, results: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medcot_lib", "sweep", str(path), "--results", str(results), *args],
                          capture_output=True, text=True)


@pytest.mark.integration
def test_a_three_rank_two_seed_sweep_runs_summarises_and_resumes(tmp_path):
    path = tmp_path / "ranks.yaml"
    path.write_text(json.dumps({"recipe": str(DEMO), "grid": {"lora_r": [4, 8, 16], "seed": [1, 2]}, "fixed": TINY,
                                "stages": ["00", "03", "04"]}))
    results = tmp_path / "results"
    result = medcot_sweep(path, results, "--parallel", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    root = results / "sweeps" / "ranks"
    names = [f"lora_r={r},seed={s}" for r in (4, 8, 16) for s in (1, 2)]
    for name in names:
        manifest = json.loads((root / name / "manifest.json").read_text())
        assert {manifest["stages"][s]["status"] for s in ("00_dataset_inspection", "03_qlora_train", "04_adapter_eval")} == {"done"}
        rank = int(name.split(",")[0].split("=")[1])
        assert manifest["parameters"]["lora_r"] == rank and json.loads((root / name / "adapter" / "adapter_config.json").read_text())["r"] == rank
    state = json.loads((root / "sweep.json").read_text())
    assert [p["status"] for p in state["points"]] == ["done"] * 6 and all(p["seconds"] > 0 for p in state["points"])
    assert "done 6, running 0, failed 0 of 6" in result.stdout and "ETA" in result.stdout
    text = (root / "summary.md").read_text()
    assert "Educational and research use only" in text
    for group in ("lora_r=4", "lora_r=8", "lora_r=16"):
        assert f"| {group} " in text.split("## Across seeds")[1].split("## Paired")[0]
    assert text.count("(n=2)") >= 3 * 2  # each group's accuracy and format compliance, over two seeds
    pairs = text.split("## Paired differences")[1]
    assert "reference: lora_r=4,seed=1" in pairs and pairs.count("4 (of 4 / 4)") == 5 * 2
    csv = (root / "summary.csv").read_text().splitlines()
    assert len(csv) == 7 and csv[0].startswith("point,status,lora_r,seed,medqa accuracy")
    assert (root / "figures" / "medqa_accuracy.png").is_file() and (root / "logs" / f"{names[0]}.log").is_file()

    started = time.monotonic()
    again = medcot_sweep(path, results)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "6 already finished (skipped), 0 to run" in again.stdout and time.monotonic() - started < 60
    assert {p["status"] for p in json.loads((root / "sweep.json").read_text())["points"]} == {"skipped"}


@pytest.mark.integration
def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    path = tmp_path / "fails.yaml"
    # min_cot_chars 100000 passes validation but leaves stage 00 no training item: a run-time failure.
    path.write_text(json.dumps({"recipe": str(DEMO), "points": [{"min_cot_chars": 100000}, {"min_cot_chars": 0}],
                                "fixed": TINY, "stages": ["00"]}))
    result = medcot_sweep(path, tmp_path / "results")
    assert result.returncode == 1
    assert "medcot: error: point min_cot_chars=100000 failed (exit 2): medcot: error:" in result.stderr
    state = json.loads((tmp_path / "results" / "sweeps" / "fails" / "sweep.json").read_text())
    failed, done = state["points"]
    assert (failed["status"], failed["exit_code"], done["status"]) == ("failed", 2, "done")
    assert "no training items are left" in failed["error"] and Path(failed["log"]).is_file()
    assert "## Failed points" in (tmp_path / "results" / "sweeps" / "fails" / "summary.md").read_text()
