"""Resume anywhere: a run killed (SIGKILL, runner and kernel together, as when a machine is lost) inside stage 01,
between stages, inside 04 and inside 05 completes on rerun, and its outputs equal an uninterrupted run's.

A small but complete recipe (every stage, greedy decoding, fixed seed) keeps this to a few minutes.
"""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_process_tree

pytestmark = pytest.mark.integration

SMALL = {"run_name": "resume", "max_steps": 4, "eval_steps": 2, "save_steps": 2, "eval_on_start": False,
         "max_new_tokens": 24, "val_size": 4, "test_size": 4, "distill_max_new_tokens": 32,
         "gguf_quant_types": "[Q8_0]", "gguf_agreement_tokens": 8}
# Fields that measure the machine rather than the result: they differ between any two runs.
VOLATILE = ("seconds", "per_s", "per_second", "rss", "memory", "peak", "elapsed", "created", "finished", "started",
            "runtime", "_time", "time_", "timings", "flos")


def command(run_dir: Path) -> list[str]:
    overrides = [arg for key, value in SMALL.items() for arg in ("-p", key, str(value).lower() if isinstance(value, bool) else str(value))]
    return [sys.executable, "-m", "medcot_lib", "run", "params/cpu-demo.yaml", "--run-dir", str(run_dir), *overrides]


def stage_status(run_dir: Path, stage: str) -> str | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["stages"].get(stage, {}).get("status")
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None  # not written yet, or caught mid-rename


def run_until_killed(run_dir: Path, ready, timeout: float = 600) -> None:
    """Start the runner; when ready() holds, SIGKILL it and every process under it (the kernels run in their own sessions)."""
    process = subprocess.Popen(command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the kill point: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the kill point was never reached")
        time.sleep(0.05)
    kill_process_tree(process)


def finish(run_dir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command(run_dir), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _stable(value, run_dir: str):
    if isinstance(value, dict):
        return {k: _stable(v, run_dir) for k, v in value.items() if not any(word in k.lower() for word in VOLATILE)}
    if isinstance(value, list):
        return [_stable(v, run_dir) for v in value]
    return value.replace(run_dir, "<run>") if isinstance(value, str) else value


def outputs(run_dir: Path) -> dict:
    """What must not depend on interruptions: metrics (machine measurements aside), generations, GGUF bytes."""
    found = {}
    for path in sorted((run_dir / "metrics").glob("*.json")):
        found[f"metrics/{path.name}"] = _stable(json.loads(path.read_text()), str(run_dir))
    found["eval/metrics.json"] = _stable(json.loads((run_dir / "eval" / "metrics.json").read_text()), str(run_dir))
    for path in sorted((run_dir / "generations").glob("*.jsonl")):
        found[f"generations/{path.name}"] = [_stable(json.loads(line), str(run_dir)) for line in path.read_text().splitlines()]
    for path in sorted(run_dir.rglob("*.gguf")):
        found[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "whole"
    finish(run_dir)
    return run_dir


def test_killed_at_four_points_then_resumed_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    kill_points = [
        ("inside 01, while generating", lambda: (run_dir / "eval" / "gguf" / "base-f16.gguf").is_file()),
        ("between 02 and 03", lambda: stage_status(run_dir, "02_quantize") == "done"),
        ("inside 04, after its merged GGUF", lambda: (run_dir / "eval" / "gguf" / "merged-f16.gguf").is_file()),
        ("inside 05, after its F16 GGUF", lambda: (run_dir / "export" / "gguf" / "resume-F16.gguf").is_file()),
    ]
    for _, ready in kill_points:
        run_until_killed(run_dir, ready)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["stages"]["05_gguf_export"]["status"] == "running"
    result = finish(run_dir)
    assert "already done, skipped (resuming)" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumes"]) == len(kill_points)
    assert not [p for p in run_dir.rglob(".*") if p.name.endswith((".tmp", ".partial.ipynb"))], "half-written files remain"
    expected, got = outputs(uninterrupted), outputs(run_dir)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name] == expected[name], f"{name} differs after kill and resume"
