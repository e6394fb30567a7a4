"""Stage 03 on several processes (accelerate launch, DDP over gloo on this CPU): the launch checks, the same loss curve
as one process, resume across process counts, one copy of each output, and a killed rank failing fast.

FSDP and DeepSpeed run only on CUDA GPUs: here their configs are read by accelerate and refused with the reason.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import kill_process_tree

from medcot_lib import cli, distributed, models, pipeline, recipe
from medcot_lib.errors import MedcotError

# One optimizer step = 2 sequences: 1 process accumulating 2, or 2 processes accumulating 1 each. Dropout is off
# because each process draws its own dropout masks (with it, the curves agree in distribution, not value by value).
SMALL = {"max_length": 160, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "max_steps": 4,
         "save_steps": 2, "eval_on_start": False, "eval_steps": 1000, "load_best_model_at_end": False, "lora_dropout": 0}
# Two processes sum their gradients in another order than one process accumulating: the losses agree to float error.
LOSS_TOLERANCE = 1e-4


def demo(**overrides):
    return recipe.load("params/cpu-demo.yaml", overrides)


# --------------------------------------------------------------------------- checks before a launch


def test_the_global_batch_must_split_across_the_processes():
    with pytest.raises(MedcotError, match=r"gradient_accumulation_steps 3 does not split across num_processes 2.*= 12"):
        demo(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_processes=2)
    assert demo(gradient_accumulation_steps=4, num_processes=4).num_processes == 4


def test_how_stage_03_is_launched_is_not_part_of_the_run_identity():
    one, two = recipe.to_parameters(demo(gradient_accumulation_steps=2)), recipe.to_parameters(
        demo(gradient_accumulation_steps=2, num_processes=2, accelerate_config="ddp"))
    assert pipeline.params_hash(one) == pipeline.params_hash(two)
    assert pipeline.params_hash(one) != pipeline.params_hash({**one, "seed": 1})


def test_more_processes_than_devices_is_refused_with_the_count_found():
    count, what = distributed.local_devices()
    (problem,) = distributed.problems(demo(num_processes=count + 1, gradient_accumulation_steps=count + 1))
    assert f"num_processes {count + 1}" in problem and f"{count} {what}" in problem


def test_the_cli_refuses_too_many_processes_before_anything_runs(tmp_path, capsys):
    count, _ = distributed.local_devices()
    run_dir = tmp_path / "run"
    code = cli.main(["run", "params/cpu-demo.yaml", "--check", "--run-dir", str(run_dir), "--num-processes", str(count + 2),
                     "-p", "gradient_accumulation_steps", str(count + 2)])
    assert code == 2 and f"{count} {distributed.local_devices()[1]}" in capsys.readouterr().out and not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU machine refuses")
def test_sharded_engines_are_read_by_accelerate_and_refused_on_a_cpu_with_the_reason():
    fsdp = distributed.problems(demo(accelerate_config="fsdp"))
    assert any("FSDP needs CUDA GPUs" in p for p in fsdp)
    zero3 = distributed.problems(demo(accelerate_config="zero3"))
    assert any("DeepSpeed needs CUDA GPUs" in p for p in zero3)
    qlora = distributed.problems(demo(accelerate_config="fsdp", load_in_4bit=True, bnb_4bit_quant_storage="uint8"))
    assert any("bnb_4bit_quant_storage uint8: FSDP shards tensors of one dtype only" in p for p in qlora)
    assert not any("quant_storage" in p for p in distributed.problems(demo(accelerate_config="fsdp", load_in_4bit=True)))
    assert any("Unsloth" in p for p in distributed.problems(demo(backend="unsloth", num_processes=2, gradient_accumulation_steps=2)))


def test_a_bad_accelerate_config_names_the_file_and_what_is_wrong(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nfsdp_sharding: FULL\n")
    (problem,) = distributed.problems(demo(accelerate_config=str(unknown)))
    assert str(unknown) in problem and "fsdp_sharding" in problem
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: MULTI_GPU\nnum_machines: [1\n")
    (problem,) = distributed.problems(demo(accelerate_config=str(broken)))
    assert f"{broken}, line" in problem and "not valid YAML" in problem
    (problem,) = distributed.problems(demo(accelerate_config=str(tmp_path / "absent.yaml")))
    assert "absent.yaml" in problem and "ddp, fsdp, zero3" in problem


def test_shipped_configs_are_accelerate_configs_of_their_engine():
    for name, engine in (("ddp", "DDP"), ("fsdp", "FSDP"), ("zero3", "DeepSpeed")):
        assert distributed.engine(distributed.read_config(Path("params/accelerate") / f"{name}.yaml")) == engine


def test_a_4bit_base_stores_its_weights_in_the_compute_dtype_only_when_sharded(monkeypatch):
    cfg = demo(load_in_4bit=True, dtype="float32")
    assert models.quantization_config(cfg).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert models.quantization_config(cfg).bnb_4bit_quant_storage == torch.float32


def test_a_cpu_launch_is_torchrun_with_gloo_workers_and_a_thread_share_each():
    command = distributed.launch_command(demo(num_processes=2, gradient_accumulation_steps=2), Path("/runs/x"), None, None)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[-3:] == ["-m", distributed.WORKER, "/runs/x"] and "--max_restarts" in command
    if not torch.cuda.is_available():
        threads = command[command.index("--num_cpu_threads_per_process") + 1]
        assert int(threads) == max(1, distributed.local_devices()[0] // 2)


TORCHRUN_SUMMARY = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "medcot_lib/train_worker.py", line 22, in main
[rank0]: RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234
W1204 16:20:01 torch/distributed/elastic/multiprocessing/api.py:900] Sending process 4242 closing signal SIGTERM
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
medcot_lib.train_worker FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[1]:
  time      : 2026-12-04_16:20:01
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4243)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4243
============================================================"""


def test_a_failed_launch_names_the_rank_the_signal_and_the_last_error():
    message = distributed.failure_message(1, TORCHRUN_SUMMARY.splitlines(), 2, Path("/runs/x/logs/03_launch.log"), 12.4)
    assert message.startswith("stage 03 failed on 2 processes after 12 s: rank 1 was killed by signal 9 (SIGKILL)")
    assert "last error: RuntimeError: [../third_party/gloo" in message and "/runs/x/logs/03_launch.log" in message


# --------------------------------------------------------------------------- real launches (gloo on this CPU)


def run_command(run_dir: Path, processes: int, **overrides) -> list[str]:
    values = {**SMALL, **overrides}
    pairs = [arg for key, value in values.items() for arg in ("-p", key, str(value).lower() if isinstance(value, bool) else str(value))]
    return [sys.executable, "-m", "medcot_lib", "run", "params/cpu-demo.yaml", "--run-dir", str(run_dir),
            "--stages", "03", "--num-processes", str(processes), *pairs]


def run_until(command: list[str], ready, timeout: float = 300) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready(process):
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its kill point: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill_process_tree(process)
            raise AssertionError("the kill point was never reached")
        time.sleep(0.05)
    return process


def finish(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "adapter" / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Stage 00 of the small recipe, once; each test trains in its own copy."""
    run_dir = tmp_path_factory.mktemp("distributed") / "prepared"
    finish([sys.executable, "-m", "medcot_lib", "run", "params/cpu-demo.yaml", "--run-dir", str(run_dir), "--stages", "00",
            *[arg for key, value in SMALL.items() for arg in ("-p", key, str(value).lower() if isinstance(value, bool) else str(value))]])
    return run_dir


def copy_of(prepared: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / name))


@pytest.mark.integration
def test_two_processes_train_one_process_curve_and_resume_under_either_count(prepared, tmp_path):
    reference = copy_of(prepared, tmp_path, "one")
    finish(run_command(reference, 1))
    expected = losses(reference)
    assert len(expected) == SMALL["max_steps"]

    checkpoint = Path("checkpoints") / "checkpoint-2" / "trainer_state.json"
    for first, then in ((2, 1), (1, 2)):
        run_dir = copy_of(prepared, tmp_path, f"{first}-then-{then}")
        kill_process_tree(run_until(run_command(run_dir, first), lambda _, d=run_dir: (d / checkpoint).is_file()))
        assert not (run_dir / "adapter").exists()
        finish(run_command(run_dir, then))
        trained = json.loads((run_dir / "metrics" / "03_qlora_train.json").read_text())
        assert trained["resumed_from"].endswith("checkpoint-2") and trained["steps_this_run"] == 2
        assert trained["processes"] == then and trained["global_batch"] == 2
        assert losses(run_dir) == pytest.approx(expected, abs=LOSS_TOLERANCE), (first, then)

    # Exactly one copy of each output: one adapter, one TensorBoard event file per launch (rank 0's), no leftovers.
    run_dir = tmp_path / "1-then-2"
    assert sorted(p.name for p in run_dir.glob("**/adapter_model.safetensors")) == ["adapter_model.safetensors"] * 3
    assert len(list((run_dir / "checkpoints" / "runs").glob("*/events.out.tfevents.*"))) == 2  # the killed run's and the resumed one's
    assert not list(run_dir.glob("**/.*.tmp")) and not (run_dir / distributed.LAUNCH_DIR).exists()
    assert (run_dir / "logs" / "03_launch.log").read_text().count("==== ") == 1

    # The adapter two processes finished loads on its base and generates.
    from medcot_lib import evaluate, generate, prompts
    from medcot_lib.data import load_prepared

    cfg = demo(**SMALL)
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    model = evaluate.attach_adapter(models.load_model(cfg), run_dir / "adapter")
    record = load_prepared(run_dir)["test"][0]
    (output,) = generate.generate(model, tokenizer, [record], prompts.PromptStyle.from_recipe(cfg),
                                  generate.Decoding(8, False, 1.0, 1.0, 1, 0), progress=False)
    assert output.new_tokens > 0


def worker_pid(runner: subprocess.Popen, rank: int) -> int | None:
    for child in psutil.Process(runner.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "medcot_lib.train_worker" in child.cmdline():
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.integration
def test_a_killed_rank_fails_the_run_fast_with_a_clear_message(prepared, tmp_path):
    run_dir = copy_of(prepared, tmp_path, "killed")
    training = run_dir / "checkpoints" / "runs"  # rank 0's TensorBoard writer: the first step is under way
    runner = run_until(run_command(run_dir, 2),
                       lambda process: training.is_dir() and worker_pid(process, 1) is not None)
    os.kill(worker_pid(runner, 1), signal.SIGKILL)
    killed = time.monotonic()
    try:
        _, stderr = runner.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        kill_process_tree(runner)
        raise AssertionError("the run hung after a rank was killed") from None
    assert runner.returncode != 0 and time.monotonic() - killed < 60
    assert "stage 03 failed on 2 processes" in stderr and "rank 1 was killed by signal 9 (SIGKILL)" in stderr, stderr[-2000:]
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["03_qlora_train"]["status"] == "failed"
    assert not (run_dir / "adapter").exists()

