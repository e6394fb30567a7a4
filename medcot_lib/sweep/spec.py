"""The sweep file: a base recipe and the overrides of each point, checked before anything runs.

Every error names the sweep file, the line and the key. Each point's overrides are validated as a recipe
(recipe.validate, so its messages name the field), and its run directory is named from the validated values,
so `1e-4` and `0.0001` are one point, and two such points are an error rather than one run overwriting another.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import recipe
from ..errors import MedcotError, input_error
from ..fileio import read_utf8

KEYS = ("recipe", "grid", "points", "fixed", "name", "stages", "smoke")
MAX_NAME = 96  # characters of a point's directory name; longer names keep a prefix and a hash
MAX_LIST = 4  # a list value longer than this is shown as first..last(count)


@dataclass(frozen=True)
class Point:
    overrides: dict[str, Any]  # every override given to `medcot run`: fixed, then the point's own (validated values)
    swept: dict[str, Any]  # the point's own overrides, which name it
    name: str
    run_dir: Path


@dataclass
class Sweep:
    file: Path
    name: str
    recipe: Path
    points: list[Point]
    swept_keys: list[str]  # every key that points or grid set, in the file's order
    stages: list[str] | None = None
    smoke: bool = False
    root: Path = field(default=Path())  # results/sweeps/<name>


def _lines(node: yaml.Node, at: tuple = ()) -> dict[tuple, int]:
    """The 1-based line of every mapping key and list item below `node`, by its path of keys and indices."""
    found = {at: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            found.update(_lines(value, (*at, key.value)))
            found[(*at, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found.update(_lines(item, (*at, index)))
    return found


def read(path: Path) -> tuple[dict, dict[tuple, int]]:
    """The sweep file's values and the line of each key (YAML and UTF-8 errors name the file and line)."""
    if not path.is_file():
        raise MedcotError(f"{path}: sweep file not found")
    text = read_utf8(path)
    try:
        node, values = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MedcotError(f"{path}{recipe._yaml_where(exc)}: not valid YAML ({recipe._yaml_problem(exc)})") from None
    if not isinstance(values, dict):
        raise input_error("a sweep file is a mapping of keys to values", file=path, line=1,
                          expected=f"keys among {', '.join(KEYS)}")
    return values, _lines(node)


def _check_parameters(overrides: Any, where: tuple, path: Path, lines: dict) -> dict:
    if not isinstance(overrides, dict):
        raise input_error(f"{'/'.join(map(str, where))} must be a mapping of recipe keys to values", file=path,
                          line=lines.get(where), field=str(where[0]), expected="e.g. {lora_r: 8, seed: 1}")
    for key in overrides:
        if key not in recipe.Recipe.model_fields:
            near = difflib.get_close_matches(str(key), recipe.Recipe.model_fields, n=1)
            hint = f"; did you mean {near[0]}?" if near else " (see the recipe fields in medcot_lib/recipe.py)"
            renamed = f"; renamed {recipe.RENAMED_KEYS[key]}" if key in recipe.RENAMED_KEYS else ""
            raise input_error(f"unknown recipe parameter '{key}' in {where[0]}{renamed or hint}", file=path,
                              line=lines.get((*where, key)), field=str(key))
    return overrides


def _combinations(values: dict, path: Path, lines: dict) -> list[dict]:
    """Every point's own overrides: each listed point times every grid combination."""
    if "grid" not in values and "points" not in values:
        raise input_error("the sweep has neither grid nor points, so there is nothing to run", file=path, line=1,
                          expected="grid: {lora_r: [4, 16]} and/or points: [{lora_r: 8}, ...]")
    grid = _check_parameters(values.get("grid", {}), ("grid",), path, lines)
    if "grid" in values and not grid:
        raise input_error("the grid is empty", file=path, line=lines.get(("grid",)), field="grid",
                          expected="each key with a non-empty list of values, e.g. {seed: [1, 2]}")
    for key, options in grid.items():
        if not isinstance(options, list) or not options:
            raise input_error(f"grid key '{key}' needs a non-empty list of values", file=path,
                              line=lines.get(("grid", key)), field=key, expected="e.g. [4, 16, 64]")
    points = values.get("points", [{}])
    if not isinstance(points, list) or not points:
        raise input_error("points must be a non-empty list of override mappings", file=path,
                          line=lines.get(("points",)), field="points", expected="e.g. [{lora_r: 8}, {lora_r: 16}]")
    for index, point in enumerate(points):
        _check_parameters(point, ("points", index), path, lines)
        if both := set(point) & set(grid):
            raise input_error(f"point {index} sets {', '.join(sorted(both))}, which the grid sweeps too", file=path,
                              line=lines.get(("points", index)), field=sorted(both)[0])
    combos = [dict(zip(grid, values_, strict=True)) for values_ in itertools.product(*grid.values())]
    return [{**point, **combo} for point in points for combo in combos]


def value_text(value: Any) -> str:
    """A value as it appears in a point's name: short, readable, and the same for equal values."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and value and all(isinstance(v, dict) and "path" in v for v in value):  # data sources
        return "+".join(str(v.get("name") or v["path"].removeprefix(recipe.BUNDLED_PREFIX).rsplit("/", 1)[-1])
                        + (f"@{v['weight']:g}" if v.get("weight", 1) != 1 else "") for v in value)
    if isinstance(value, list):
        shown = value if len(value) <= MAX_LIST else [value[0], "..", value[-1]]
        text = "+".join(value_text(v) for v in shown).replace("+..+", "..")
        return text if len(value) <= MAX_LIST else f"{text}({len(value)})"
    if isinstance(value, dict):
        return "h" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def point_name(swept: dict[str, Any]) -> str:
    """`lora_r=8,learning_rate=0.0001,seed=1`: filesystem-safe; a long name keeps a prefix and a hash of the values."""
    if not swept:
        return "base"
    name = re.sub(r"[^\w.=,+@-]+", "-", ",".join(f"{key}={value_text(value)}" for key, value in swept.items()))
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(json.dumps(swept, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME - 12]}~{digest}"
    return name


def _describe(overrides: dict) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in overrides.items()) + "}"


def load(path: str | Path, results_root: Path) -> Sweep:
    """Read and check a sweep file; each point's recipe is validated and named. Nothing is written."""
    path = Path(path)
    values, lines = read(path)
    for key in values:
        if key not in KEYS:
            raise input_error(f"unknown sweep key '{key}'", file=path, line=lines.get((key,)), field=str(key),
                              expected=f"one of {', '.join(KEYS)}; recipe parameters go under grid, points or fixed")
    if "recipe" not in values:
        raise input_error("no recipe: name the base recipe file (relative to the sweep file)", file=path, line=1,
                          field="recipe", expected="e.g. recipe: ../cpu-demo.yaml")
    recipe_path = Path(os.path.normpath(path.parent / str(values["recipe"])))
    if not recipe_path.is_file():
        raise input_error(f"recipe file not found: {recipe_path}", file=path, line=lines.get(("recipe",)), field="recipe")
    fixed = _check_parameters(values.get("fixed", {}), ("fixed",), path, lines)
    own = _combinations(values, path, lines)
    for key in fixed:
        if any(key in o for o in own):
            raise input_error(f"'{key}' is both fixed and swept", file=path, line=lines.get(("fixed", key)), field=key)
    stages = values.get("stages")
    if stages is not None and (not isinstance(stages, list) or not stages):
        raise input_error("stages must be a list, e.g. [00, 03, 04]", file=path, line=lines.get(("stages",)), field="stages")
    if not isinstance(values.get("smoke", False), bool):
        raise input_error("smoke must be true or false", file=path, line=lines.get(("smoke",)), field="smoke")
    name = str(values.get("name", path.stem))
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise input_error(f"'{name}' is not a usable directory name", file=path, line=lines.get(("name",)), field="name",
                          expected="letters, digits, _ . -")
    base = recipe.read_yaml(recipe_path)
    root = results_root / "sweeps" / name
    points, seen = [], {}
    for overrides in own:
        cfg = recipe.validate({**base, **fixed, **overrides},
                              origin=f"{path}: point {_describe(overrides)} on {recipe_path}")
        canonical = cfg.model_dump(mode="json")
        swept = {key: canonical[key] for key in overrides}
        point = Point({**{k: canonical[k] for k in fixed}, **swept}, swept, point_name(swept), root / point_name(swept))
        if point.name in seen:
            raise MedcotError(f"{path}: points {_describe(seen[point.name])} and {_describe(overrides)} resolve to the same "
                              f"run directory {point.run_dir} (equal values once validated); remove one of them")
        seen[point.name] = overrides
        points.append(point)
    swept_keys = list(dict.fromkeys(key for o in own for key in o))
    # YAML reads a bare 00 or 03 as a number: it means the stage numbered so.
    stages = [f"{s:02d}" if isinstance(s, int) else str(s) for s in stages] if stages else None
    return Sweep(path, name, recipe_path, points, swept_keys, stages,
                 bool(values.get("smoke", False)), root)
