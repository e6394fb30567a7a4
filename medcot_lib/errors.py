"""One exception type for bad input, whose message names where the problem is and what was expected."""

from __future__ import annotations

from pathlib import Path


class MedcotError(Exception):
    """Bad input or an unusable setting. The CLI prints the message and exits non-zero."""


def input_error(
    message: str,
    *,
    file: str | Path | None = None,
    line: int | None = None,
    row: int | None = None,
    field: str | None = None,
    expected: str | None = None,
) -> MedcotError:
    """Build a MedcotError that reads 'file, line N (or row N), field X: message (expected ...)'."""
    where = []
    if file is not None:
        where.append(str(file))
    if line is not None:
        where.append(f"line {line}")
    if row is not None:  # datasets read through `load_dataset` (hub ids, hub-layout directories) have rows, not lines
        where.append(f"row {row}")
    if field is not None:
        where.append(f"field '{field}'")
    text = (", ".join(where) + ": " if where else "") + message
    if expected:
        text += f" (expected {expected})"
    return MedcotError(text)
