"""Stage 03 on several processes: `accelerate launch` runs the same training on each (DDP, FSDP or DeepSpeed ZeRO-3).

Papermill executes a notebook in one kernel and cannot fork ranks, so with `num_processes` above 1 the notebook's
kernel launches `medcot_lib.train_worker` under accelerate, waits, and then shows what rank 0 wrote. Every process
loads the model and trains on its shard of each global batch; only rank 0 writes the adapter, checkpoints, logs and
the result. The other stages always run in one process.

The recipe's global batch is kept (recipe.py): each of N processes accumulates gradient_accumulation_steps / N
micro-batches, so the loss curve does not depend on the process count, and a checkpoint resumes under another one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .errors import MedcotError

SHIPPED_CONFIGS = ("ddp", "fsdp", "zero3")  # params/accelerate/NAME.yaml
ENGINES = {"MULTI_GPU": "DDP", "MULTI_CPU": "DDP", "NO": "DDP", "FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}
WORKER = "medcot_lib.train_worker"
LAUNCH_DIR = ".launch"  # in the run directory while a launch runs: the parameters in, rank 0's result out
PARAMS_FILE, RESULT_FILE = "params.json", "result.json"
LOG_FILE = Path("logs") / "03_launch.log"
# torchrun's agent checks its workers every MONITOR_INTERVAL_S; when one dies it stops the others (SIGTERM, then
# SIGKILL after its grace period), so a killed rank fails the whole launch in seconds instead of leaving the
# survivors blocked in a collective until the 30-minute process-group timeout.
MONITOR_INTERVAL_S = 1


def requested(cfg) -> bool:
    return cfg.num_processes > 1


def config_file(cfg) -> Path | None:
    """The accelerate config file the recipe names: a shipped name (params/accelerate/) or a path."""
    if cfg.accelerate_config is None:
        return None
    if cfg.accelerate_config in SHIPPED_CONFIGS:
        from .pipeline import repo_root

        return repo_root() / "params" / "accelerate" / f"{cfg.accelerate_config}.yaml"
    path = Path(cfg.accelerate_config).expanduser().resolve()
    if not path.is_file():
        raise MedcotError(f"accelerate_config: no file {path} (expected {', '.join(SHIPPED_CONFIGS)}, or the path of an "
                          f"accelerate config file, as `accelerate config` writes)")
    return path


def read_config(path: Path) -> dict:
    """An accelerate config file, with its engine checked."""
    from .fileio import read_utf8
    from .recipe import _yaml_problem, _yaml_where

    try:
        config = yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as exc:
        raise MedcotError(f"{path}{_yaml_where(exc)}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(config, dict):
        raise MedcotError(f"{path}: expected an accelerate config (a mapping of its settings), got {type(config).__name__}")
    from accelerate.commands.config.config_args import ClusterConfig

    try:  # accelerate's own reading: unknown keys and values are its errors
        ClusterConfig.from_yaml_file(str(path))
    except (ValueError, TypeError, KeyError) as exc:
        raise MedcotError(f"{path}: not an accelerate config accelerate accepts: {exc}") from None
    kind = config.get("distributed_type", "MULTI_GPU")
    if kind not in ENGINES:
        raise MedcotError(f"{path}: distributed_type {kind!r} is not one medcot launches (expected one of {', '.join(ENGINES)})")
    return config


def launch_config(cfg) -> tuple[Path | None, dict | None]:
    """(path, settings) of the recipe's accelerate config file, read once; (None, None) without one."""
    path = config_file(cfg)
    return path, read_config(path) if path else None


def engine(config: dict | None) -> str:
    return ENGINES[(config or {}).get("distributed_type", "MULTI_GPU")]


def local_devices() -> tuple[int, str]:
    """(count, what) of the devices one machine can give a process each: CUDA GPUs, else CPU cores (gloo)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA GPU"
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, "CPU core"


def world_size() -> int:
    """Processes training together: torchrun's WORLD_SIZE in a launched worker, 1 in a notebook's kernel."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def problems(cfg) -> list[str]:
    """Everything that stops this recipe's launch on this machine, found before anything runs."""
    import importlib.util

    import torch

    try:
        path, config = launch_config(cfg)
    except MedcotError as exc:
        return [str(exc)]
    found = []
    machines = int((config or {}).get("num_machines", 1))
    count, what = local_devices()
    if cfg.num_processes % machines:
        found.append(f"num_processes {cfg.num_processes} does not split across num_machines {machines} in {path}")
    elif cfg.num_processes // machines > count:
        found.append(f"num_processes {cfg.num_processes} needs {cfg.num_processes // machines} processes on this machine, "
                     f"one per device, and {count} {what}{'s' if count != 1 else ''} {'were' if count != 1 else 'was'} "
                     f"found here")
    kind = engine(config)
    if kind != "DDP" and not torch.cuda.is_available():
        found.append(f"accelerate_config {cfg.accelerate_config}: {kind} needs CUDA GPUs (accelerate launches it on GPUs "
                     f"only); on a CPU use ddp (gloo)")
    if kind == "DeepSpeed" and importlib.util.find_spec("deepspeed") is None:
        found.append(f"accelerate_config {cfg.accelerate_config}: the deepspeed package is not installed "
                     f"(pip install deepspeed on the GPU machine)")
    if kind != "DDP" and cfg.load_in_4bit and cfg.bnb_4bit_quant_storage not in ("auto", compute_dtype_name(cfg)):
        found.append(f"bnb_4bit_quant_storage {cfg.bnb_4bit_quant_storage}: {kind} shards tensors of one dtype only, so "
                     f"a 4-bit base must store its weights in the compute dtype ({compute_dtype_name(cfg)}); use auto")
    if requested(cfg) and cfg.backend == "unsloth":
        found.append("backend unsloth: Unsloth's open-source release trains on one GPU; use backend hf to train on "
                     f"{cfg.num_processes} processes")
    return found


def compute_dtype_name(cfg) -> str:
    """The 4-bit compute dtype as a recipe value (auto resolved), e.g. bfloat16."""
    from .models import compute_dtype

    return str(compute_dtype(cfg)).removeprefix("torch.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(cfg, run_dir: Path, path: Path | None, config: dict | None) -> list[str]:
    """`accelerate launch` of the worker on the recipe's processes; a config file adds the engine and the machines."""
    import torch

    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.num_processes),
               "--max_restarts", "0", "--monitor_interval", str(MONITOR_INTERVAL_S)]
    if path:
        command += ["--config_file", str(path)]
        if "main_process_port" not in config:
            command += ["--main_process_port", str(free_port())]
    else:
        # torchrun's launcher also for CPU processes: accelerate's own --cpu launcher needs MPI. Each worker then
        # joins a gloo group on the CPU (TrainingArguments.use_cpu), or NCCL on its GPU.
        command += ["--multi_gpu", "--num_machines", "1", "--main_process_port", str(free_port()),
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
        if not torch.cuda.is_available():
            command += ["--num_cpu_threads_per_process", str(max(1, local_devices()[0] // cfg.num_processes))]
    return [*command, "-m", WORKER, str(run_dir)]


def launch(cfg, run_dir: str | Path, echo=print) -> tuple[dict, list[dict]]:
    """Train on cfg.num_processes processes; return (metrics, log history) as rank 0 wrote them.

    The launcher's output goes to logs/03_launch.log and, line by line, to `echo` (the notebook's output).
    """
    from . import recipe
    from .fileio import write_json

    found = problems(cfg)
    if found:
        raise MedcotError("cannot launch stage 03 on several processes:\n  " + "\n  ".join(found))
    run_dir = Path(run_dir).resolve()
    exchange = run_dir / LAUNCH_DIR
    shutil.rmtree(exchange, ignore_errors=True)
    write_json(exchange / PARAMS_FILE, recipe.to_parameters(cfg))
    log = run_dir / LOG_FILE
    log.parent.mkdir(parents=True, exist_ok=True)
    path, config = launch_config(cfg)
    command = launch_command(cfg, run_dir, path, config)
    echo(f"launching {cfg.num_processes} processes ({engine(config)}): "
         f"{' '.join(command[1:])}")
    started = time.monotonic()
    with open(log, "a", encoding="utf-8") as out:  # appended: a resumed run keeps each attempt's output
        out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail = []
        for line in process.stdout:
            out.write(line)
            tail = [*tail[-199:], line.rstrip("\n")]
            echo(line.rstrip("\n"))
        code = process.wait()
    if code != 0:
        raise MedcotError(failure_message(code, tail, cfg.num_processes, log, time.monotonic() - started))
    machine = int((config or {}).get("machine_rank", 0))
    if machine != 0:  # another machine of a multi-node run: rank 0, on machine 0, wrote the adapter and the result
        shutil.rmtree(exchange, ignore_errors=True)
        return {"machine_rank": machine, "outputs": "on machine 0, with rank 0", "runtime_s": round(time.monotonic() - started, 1)}, []
    result = json.loads((exchange / RESULT_FILE).read_text())
    shutil.rmtree(exchange, ignore_errors=True)
    return result["metrics"], result["log_history"]


def failure_message(code: int, lines: list[str], processes: int, log: Path, seconds: float) -> str:
    """What failed, from torchrun's summary (rank, exit code, signal) and the workers' own last error."""
    ranks = []
    for index, line in enumerate(lines):
        match = re.match(r"\s*rank\s*:\s*(\d+)", line)
        if match:
            block = " ".join(lines[index:index + 6])
            exit_code = re.search(r"exitcode\s*:\s*(-?\d+)", block)
            signal = re.search(r"Signal (\d+) \((\w+)\)", block)
            how = (f"was killed by signal {signal.group(1)} ({signal.group(2)})" if signal
                   else f"exited with code {exit_code.group(1)}" if exit_code else "failed")
            ranks.append(f"rank {match.group(1)} {how}")
    plain = [re.sub(r"^\[rank\d+\]:\s*", "", line) for line in lines]  # torchrun prefixes each worker's lines
    errors = [line.strip() for line in plain if re.match(r"[\w.]*(Error|Exception)\b.*:", line) and "ChildFailedError" not in line]
    what = "; ".join(dict.fromkeys(ranks)) or f"accelerate launch exited with code {code}"
    cause = f"\n  last error: {errors[-1]}" if errors else ""
    return (f"stage 03 failed on {processes} processes after {seconds:.0f} s: {what}; the other processes were "
            f"stopped{cause}\n  full output: {log}\n  rerun the same command to resume from the last checkpoint "
            f"(under any num_processes)")
