"""The runner: executes the stage notebooks of a recipe in order with papermill.

results/<run>/ receives the executed notebooks, per-stage metrics, figures, prepared data and
a manifest (parameters, package versions, git commit, data hashes, hardware, stage status).
A finished run is never overwritten unless asked; an unfinished one resumes after its last
completed stage, provided its parameters are unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import DISCLAIMER, __version__, random_models
from .data import reference_file
from .errors import MedcotError
from .fileio import read_utf8, sha256_file, write_json
from .recipe import (
    BUNDLED_PREFIX,
    DISTILLED,
    LAUNCH_KEYS,
    Recipe,
    is_dataset_dir,
    is_local_file,
    to_parameters,
)

STAGE_FILE = re.compile(r"^(\d\d[a-z]?)_[a-z0-9_]+\.ipynb$")
MANIFEST = "manifest.json"
# Bumped when the run directory's layout or the manifest's meaning changes; an older run directory is refused.
MANIFEST_SCHEMA = 1
# Optional stages and the recipe switch that turns each on; the others always run.
OPTIONAL_STAGES = {"00b_teacher_cot": "distillation", "06_chat_demo": "chat_demo"}


def repo_root() -> Path:
    """The checkout this package was installed from (editable install), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "notebooks").is_dir() else Path.cwd()


def discover_stages(notebooks_dir: Path) -> list[Path]:
    """Stage notebooks, in pipeline order: NN_name.ipynb (and NNx_name.ipynb for inserted stages)."""
    if not notebooks_dir.is_dir():
        raise MedcotError(f"{notebooks_dir}: notebooks directory not found (use --notebooks)")
    return sorted(p for p in notebooks_dir.iterdir() if STAGE_FILE.match(p.name))


def select_stages(stages: list[Path], wanted: list[str] | None) -> list[Path]:
    if not wanted:
        return stages
    chosen = []
    for w in wanted:
        match = [s for s in stages if s.stem == w or STAGE_FILE.match(s.name).group(1) == w]
        if not match:
            raise MedcotError(f"--stages: no stage '{w}' (available: {', '.join(s.stem for s in stages)})")
        chosen.extend(m for m in match if m not in chosen)
    return sorted(chosen)


def params_hash(params: dict[str, Any]) -> str:
    """The run's identity. How stage 03 is launched is not part of it: the global batch is the recipe's whatever the
    process count, so an interrupted run resumes under another num_processes or accelerate_config."""
    what = {key: value for key, value in params.items() if key not in LAUNCH_KEYS}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def absolute_paths(cfg: Recipe) -> Recipe:
    """Make local data paths absolute, so notebooks find them whatever their working directory."""

    def fix(source):
        update = {key: str(Path(value).expanduser().resolve()) for key in ("path", "ground_truth")
                  if (value := getattr(source, key)) and not value.startswith(BUNDLED_PREFIX) and is_local_file(value)}
        return source.model_copy(update=update)

    return cfg.model_copy(update={key: [fix(s) for s in getattr(cfg, key)]
                                  for key in ("dataset_mixture", "eval_datasets", "distill_sources")})


# --------------------------------------------------------------------------- manifest facts


def package_versions() -> dict[str, str]:
    """Versions of medcot's declared dependencies (and optional ones, where installed)."""
    versions = {"medcot": __version__, "python": platform.python_version()}
    for requirement in declared_requirements():
        name = re.split(r"[\s\[=<>;!~]", requirement, maxsplit=1)[0]
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def declared_requirements() -> list[str]:
    """medcot's requirements: from its installed metadata, or from pyproject.toml when the checkout is merely on the
    path (Colab, or a bare GPU machine given the repository and a few wheels)."""
    try:
        return importlib.metadata.requires("medcot") or []
    except importlib.metadata.PackageNotFoundError:
        project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
        return project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]


def git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": None, "dirty": None}


def hardware() -> dict[str, Any]:
    import psutil
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus or "none (CPU only)",
    }


def data_hashes(cfg: Recipe) -> dict[str, str]:
    hashes = {}
    for source in cfg.dataset_mixture + cfg.eval_datasets + cfg.distill_sources:
        for ref in filter(None, (source.path, source.ground_truth)):
            if ref == DISTILLED:
                hashes[ref] = "written by stage 00b in this run: distill/distilled.json"
                continue
            path = reference_file(ref)
            if path:
                hashes[ref] = f"sha256:{sha256_file(path)}"
            elif is_dataset_dir(ref):
                files = sorted(p for p in Path(ref).expanduser().rglob("*") if p.is_file() and ".cache" not in p.parts)
                digest = hashlib.sha256("".join(f"{p.relative_to(Path(ref).expanduser())}:{sha256_file(p)}\n" for p in files).encode())
                hashes[ref] = f"sha256 of {len(files)} files:{digest.hexdigest()} (config {source.config}, split {source.split})"
            else:
                hashes[ref] = f"hub:{ref} (config {source.config}, split {source.split})"
    return hashes


# What each stage reads from earlier ones: {stage: [(file under the run directory, the stage that writes it)]}.
STAGE_INPUTS = {
    "00b_teacher_cot": [("data/report.json", "00_dataset_inspection")],
    "01_baseline": [("data/report.json", "00_dataset_inspection")],
    "03_qlora_train": [("data/report.json", "00_dataset_inspection")],
    "04_adapter_eval": [("data/report.json", "00_dataset_inspection"), ("adapter/adapter_model.safetensors", "03_qlora_train")],
    "05_gguf_export": [("data/report.json", "00_dataset_inspection"), ("adapter/adapter_model.safetensors", "03_qlora_train")],
    "06_chat_demo": [("data/report.json", "00_dataset_inspection"), ("adapter/adapter_model.safetensors", "03_qlora_train")],
}


def require_inputs(run_dir: str | Path, stage: str) -> None:
    """Stop a stage at once, naming the stage to run first, when an earlier stage's outputs are missing.

    A notebook opened on its own (a Colab badge, say) has no earlier outputs; failing here beats failing
    minutes later inside a library call.
    """
    missing = [(name, writer) for name, writer in STAGE_INPUTS.get(stage, []) if not (Path(run_dir) / name).is_file()]
    if missing:
        first = min(writer for _, writer in missing)
        raise MedcotError(
            f"stage {stage} needs the outputs of earlier stages in {run_dir}: "
            + ", ".join(f"{name} (from {writer})" for name, writer in missing)
            + f". Run stage {first} first: `medcot run RECIPE --run-dir {run_dir} --stages {first.split('_')[0]}` "
            f"(or `medcot run RECIPE` for the whole pipeline), or execute notebooks/{first}.ipynb with this run_dir")


def write_metrics(run_dir: str | Path, stage: str, metrics: dict[str, Any], cfg: Recipe) -> Path:
    """Record a stage's metrics in results/<run>/metrics/<stage>.json, with the model and whether its weights are random."""
    return write_json(Path(run_dir) / "metrics" / f"{stage}.json", {**random_models.weights(cfg.model_name_or_path), **metrics})


# --------------------------------------------------------------------------- running


class _QuietUnknownParameters(logging.Filter):
    """Each notebook declares the knobs it uses; the rest of the recipe is passed along on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


def _ipc_kernel_manager(socket_dir: str):
    """A kernel manager whose kernel talks over IPC sockets in socket_dir (private to this user), not over TCP.

    Over TCP, ipykernel warns on every stage that all traffic is unencrypted, and any local user could connect.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self) -> str:
            return "ipc"

        @default("ip")
        def _default_ip(self) -> str:
            return os.path.join(socket_dir, "kernel")

    return IPCKernelManager


def resolve_run_dir(cfg: Recipe, run_dir: Path | None) -> Path:
    """--run-dir, else results/<run_name> in the checkout."""
    return (run_dir or repo_root() / "results" / cfg.run_name).resolve()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run's manifest, refused (with what to do) when it is corrupt or was written by another medcot version."""
    path = run_dir / MANIFEST
    restart = "pass --overwrite to start the run again, or use another --run-dir"
    try:
        manifest = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise MedcotError(f"{path}, line {exc.lineno}: the manifest is corrupt ({exc.msg}), so this run cannot be "
                          f"resumed safely; {restart}") from None
    if not isinstance(manifest, dict) or not {"status", "params_hash", "stages"} <= set(manifest):
        raise MedcotError(f"{path}: the manifest is corrupt (expected an object with status, params_hash and stages), "
                          f"so this run cannot be resumed safely; {restart}")
    written_by = manifest.get("versions", {}).get("medcot")
    if manifest.get("manifest_schema") != MANIFEST_SCHEMA or written_by != __version__:
        raise MedcotError(f"{run_dir} was written by medcot {written_by or 'of an unknown older version'} "
                          f"(manifest schema {manifest.get('manifest_schema', 'none')}); this is medcot {__version__} "
                          f"(schema {MANIFEST_SCHEMA}). Outputs of two versions must not be mixed in one run: {restart}, "
                          f"or resume it with medcot {written_by or 'as it was then'}")
    return manifest


def _open_manifest(run_dir: Path, cfg: Recipe, params: dict, overwrite: bool) -> dict[str, Any]:
    path = run_dir / MANIFEST
    if path.exists() and not overwrite:
        old = read_manifest(run_dir)
        if old.get("status") == "finished":
            raise MedcotError(f"{run_dir} holds a finished run; pass --overwrite to replace it, or use another --run-dir")
        if old.get("params_hash") != params_hash(params):
            raise MedcotError(f"{run_dir} holds an unfinished run with different parameters; pass --overwrite to start again, or use another --run-dir")
        # Provenance: when the run was resumed, and what the interrupted attempt left half-written.
        old.setdefault("resumes", []).append({"at": _now(), "removed_leftovers": _remove_leftovers(run_dir)})
        return old
    if path.exists():
        _clear_run(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise MedcotError(f"{run_dir} exists, is not empty and has no {MANIFEST}; refusing to write into it")
    return {
        "run_name": cfg.run_name,
        "manifest_schema": MANIFEST_SCHEMA,
        "status": "running",
        "created": _now(),
        "params_hash": params_hash(params),
        "parameters": params,
        "command": " ".join(sys.argv),
        "versions": package_versions(),
        "git": git_state(repo_root()),
        "data": data_hashes(cfg),
        "hardware": hardware(),
        "disclaimer": DISCLAIMER,
        "stages": {},
    }


def _remove_leftovers(run_dir: Path) -> list[str]:
    """Delete what a killed run left half-written: atomic writes' temporaries (.NAME.*.tmp) and partial notebooks.

    Every result is written to a temporary beside it and renamed when complete (fileio.atomic_path/atomic_dir),
    so a temporary is by construction incomplete; a resumed stage writes its outputs afresh.
    """
    import shutil

    removed = []
    for path in sorted(run_dir.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if path.exists() and (path.name.endswith(".tmp") or path.name.endswith(".partial.ipynb")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(str(path.relative_to(run_dir)))
    return removed


def _clear_run(run_dir: Path) -> None:
    """Remove a previous run's outputs (only ever called on a directory holding a medcot manifest)."""
    import shutil

    for child in run_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def run(
    cfg: Recipe,
    *,
    run_dir: Path | None = None,
    stages: list[str] | None = None,
    notebooks_dir: Path | None = None,
    overwrite: bool = False,
    notes: list[str] | None = None,
    echo=print,
) -> Path:
    """Execute the selected stage notebooks in order; return the run directory."""

    cfg = absolute_paths(cfg)
    notebooks_dir = notebooks_dir or repo_root() / "notebooks"
    selected = select_stages(discover_stages(notebooks_dir), stages)
    run_dir = resolve_run_dir(cfg, run_dir)
    params = to_parameters(cfg)
    manifest = _open_manifest(run_dir, cfg, params, overwrite)
    manifest["status"] = "running"
    manifest["smoke"] = notes or []  # each substitution smoke mode made, empty for a real run
    manifest["weights"] = random_models.weights(cfg.model_name_or_path)["weights"]
    if random_models.is_random(cfg.model_name_or_path):
        echo(manifest["weights"])
    write_json(run_dir / MANIFEST, manifest)
    logging.getLogger("papermill").addFilter(_QuietUnknownParameters())

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="medcot-kernel-") as socket_dir:
        _run_stages(selected, cfg, run_dir, params, manifest, _ipc_kernel_manager(socket_dir), notebooks_dir, echo, started)
    all_done = all(manifest["stages"].get(s.stem, {}).get("status") in ("done", "skipped") for s in discover_stages(notebooks_dir))
    manifest["status"] = "finished" if all_done else "partial"
    manifest["finished"] = _now()
    write_json(run_dir / MANIFEST, manifest)
    return run_dir


def _run_stages(selected: list[Path], cfg: Recipe, run_dir: Path, params: dict, manifest: dict, kernel_manager,
                notebooks_dir: Path, echo, started: float) -> None:
    import papermill

    for number, notebook in enumerate(selected, start=1):
        name = notebook.stem
        if manifest["stages"].get(name, {}).get("status") == "done":
            echo(f"[{number}/{len(selected)}] {name}: already done, skipped (resuming)")
            continue
        if name in OPTIONAL_STAGES and not getattr(cfg, OPTIONAL_STAGES[name]):
            manifest["stages"][name] = {"status": "skipped", "why": f"{OPTIONAL_STAGES[name]} is false"}
            echo(f"[{number}/{len(selected)}] {name}: skipped ({OPTIONAL_STAGES[name]} is false)")
            continue
        echo(f"[{number}/{len(selected)}] {name} ...")
        manifest["stages"][name] = {"status": "running", "started": _now()}
        write_json(run_dir / MANIFEST, manifest)
        t0 = time.monotonic()
        partial = run_dir / f".{name}.partial.ipynb"
        try:
            papermill.execute_notebook(
                str(notebook), str(partial), parameters={**params, "run_dir": str(run_dir), "batch": True},
                kernel_name="python3", cwd=str(notebooks_dir), progress_bar=False, kernel_manager_class=kernel_manager,
            )
            os.replace(partial, run_dir / notebook.name)
            (run_dir / f"{name}.failed.ipynb").unlink(missing_ok=True)  # an earlier attempt's, now superseded
        except papermill.PapermillExecutionError as exc:
            # Keep the executed notebook (papermill saved it cell by cell): it holds the traceback.
            failed = run_dir / f"{name}.failed.ipynb"
            os.replace(partial, failed)
            manifest["stages"][name].update(status="failed", error=f"{exc.ename}: {exc.evalue}", notebook=failed.name)
            manifest["status"] = "failed"
            write_json(run_dir / MANIFEST, manifest)
            raise MedcotError(f"stage {name} failed: {exc.ename}: {exc.evalue}\n  executed notebook with the traceback: {failed}") from None
        finally:
            partial.unlink(missing_ok=True)
        seconds = round(time.monotonic() - t0, 1)
        manifest["stages"][name].update(status="done", finished=_now(), seconds=seconds)
        write_json(run_dir / MANIFEST, manifest)
        echo(f"[{number}/{len(selected)}] {name}: done in {seconds:.1f} s (elapsed {time.monotonic() - started:.1f} s)")

