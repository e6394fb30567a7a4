"""The method: sides run in turn after a warm-up, medians with min-max, paired ratios, power-law fits, targets;
and percentiles of a list of lengths."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable


def alternate(sides: dict[str, Callable[[], dict]], repeats: int, warmup: bool = True) -> dict[str, list[dict]]:
    """Run every side once to warm up (discarded), then all sides in turn, `repeats` times: A B A B ..."""
    if warmup:
        for side in sides.values():
            side()
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            runs[name].append(side())
    return runs


def summary(values: Iterable[float]) -> dict | None:
    """Median and min-max of a metric over repetitions (None when no run produced it)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict[str, dict]:
    """summary() of every numeric metric of a side's runs."""
    keys = dict.fromkeys(k for run in runs for k, v in run.items() if isinstance(v, int | float) and not isinstance(v, bool))
    return {k: summary(run.get(k) for run in runs) for k in keys}


def ratio(a: list[float | None], b: list[float | None]) -> dict | None:
    """median(a) / median(b), and the range of a_i / b_i over repetitions i (paired: run back to back)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y]
    if not pairs:
        return None
    paired = [x / y for x, y in pairs]
    return {"median": statistics.median(x for x, _ in pairs) / statistics.median(y for _, y in pairs),
            "min": min(paired), "max": max(paired), "n": len(pairs)}


def fit_power_law(x: list[float], y: list[float]) -> dict:
    """Least-squares fit of y = coefficient * x ** exponent in log-log space; exponent 1 is linear growth."""
    import numpy as np

    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    exponent, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (exponent * lx + intercept)
    spread = float(((ly - ly.mean()) ** 2).sum())
    return {"exponent": float(exponent), "coefficient": float(np.exp(intercept)),
            "r2": 1.0 - float((residual ** 2).sum()) / spread if spread else 1.0}


def target(figure: str, value: dict | float | None, op: str, goal: float, unit: str = "") -> dict:
    """A target with its measured value (a summary, or a single number) and whether it was met (on the median)."""
    spread = value if isinstance(value, dict) else None
    median = spread["median"] if spread else value
    met = median is not None and (median >= goal if op == ">=" else median <= goal)
    return {"figure": figure, "target": f"{op} {goal:g}{unit}", "op": op, "goal": goal, "unit": unit, "value": median,
            "min": spread["min"] if spread else None, "max": spread["max"] if spread else None, "met": bool(met)}


def describe(values: list[int]) -> dict:
    import numpy as np

    v = np.asarray(values)
    return {"n": int(v.size), "median": float(np.median(v)), "p5": float(np.percentile(v, 5)),
            "p95": float(np.percentile(v, 95)), "max": int(v.max()), "mean": float(v.mean())}
