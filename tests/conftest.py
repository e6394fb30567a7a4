import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL a runner and every process under it (kernels, training workers), as when a machine is lost."""
    family = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (materialises the checkpoint once per cache)."""
    from medcot_lib import models

    return models.load_tokenizer(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The CPU demo, run once per test session with the recipe as shipped: (run directory, the runner's result).

    Shared by tests/test_pipeline.py and tests/test_chat.py (about 13 minutes on 2 cores).
    """
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    args = ["run", "params/cpu-demo.yaml", "--run-dir", str(run_dir)]
    result = subprocess.run([sys.executable, "-m", "medcot_lib", *args], capture_output=True, text=True)
    if result.returncode:
        raise AssertionError(f"medcot {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return run_dir, result


@pytest.fixture
def write(tmp_path):
    """Write text (or JSON-serialisable objects as JSONL) to a file in tmp_path and return its path."""

    def _write(name: str, content) -> Path:
        path = tmp_path / name
        if not isinstance(content, str):
            content = "".join(json.dumps(row) + "\n" for row in content)
        path.write_text(content, encoding="utf-8")
        return path

    return _write
