import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (materialises the checkpoint once per cache)."""
    from medcot_lib import models

    return models.load_tokenizer(models.DEFAULT_MODEL)


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
