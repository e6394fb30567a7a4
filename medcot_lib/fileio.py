"""Atomic file writes: a result is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import input_error

UTF8_BOM = b"\xef\xbb\xbf"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | Path):
    return json.loads(read_utf8(path))


def read_utf8(path: str | Path) -> str:
    """A text file's contents; bytes that are not UTF-8 raise an error naming the file, line and byte offset.

    A leading byte-order mark is dropped. There is no guessing of other encodings: a latin-1 file
    read as if it were something else would silently corrupt the medical text.
    """
    raw = Path(path).read_bytes()
    skip = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line_start = raw.rfind(b"\n", 0, offset) + 1
        raise input_error(
            f"not valid UTF-8: byte 0x{raw[offset]:02x} at byte offset {offset} (column {offset - line_start + 1}) "
            f"{exc.reason}",
            file=path, line=raw.count(b"\n", 0, offset) + 1, field=_key_before(raw[:offset]),
            expected="UTF-8 text; convert the file first, e.g. `iconv -f latin1 -t utf-8 in.json > out.json`",
        ) from None


# The last JSON key ("key": ...) or YAML key (key: ...) before a position: the field a bad byte belongs to.
_JSON_KEY = re.compile(rb'"((?:[^"\\\n]|\\.)*)"\s*:')
_YAML_KEY = re.compile(rb"^[ \t-]*([A-Za-z_][\w.-]*)[ \t]*:", re.MULTILINE)


def _key_before(head: bytes) -> str | None:
    head = head[-65536:]  # an item's fields lie well within 64 KiB of its bad byte; scanning a 1 GB head would crawl
    matches = list(_JSON_KEY.finditer(head)) or list(_YAML_KEY.finditer(head))
    return matches[-1].group(1).decode("utf-8", "replace") if matches else None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
