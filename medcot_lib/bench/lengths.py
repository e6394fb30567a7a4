"""Sequence lengths: the real medical-o1 length distribution, bundled records cut to follow it, padding shares."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics

from .. import data, prompts, recipe
from ..data import Record

# medical-o1 whole-record lengths in SmolLM2 tokens (/work/shared/DATA_FACTS.md). Their p5 and p95 lie equally far
# from the median in log space (ln 670 - ln 481 = ln 933 - ln 670 = 0.33), so a lognormal through the three fits them.
REAL_MEDIAN, REAL_P5, REAL_P95, REAL_MAX = 670, 481, 933, 1074
MIN_REASONING_TOKENS = 32  # a shortened record keeps at least this much reasoning
PADDING_SAMPLE = 1024  # sequences drawn from that distribution to estimate the expected padding share of random batches


def real_lengths(n: int) -> list[int]:
    """n sequence lengths at evenly spaced quantiles of the real medical-o1 distribution (lognormal), capped at its max."""
    sigma = (math.log(REAL_P95) - math.log(REAL_P5)) / (2 * statistics.NormalDist().inv_cdf(0.95))
    dist = statistics.NormalDist(math.log(REAL_MEDIAN), sigma)
    return [min(REAL_MAX, round(math.exp(dist.inv_cdf((i + 0.5) / n)))) for i in range(n)]


def _shorten(record: Record, length: int, tokenizer, style: prompts.PromptStyle) -> Record:
    """The record with its reasoning cut (in tokens) so that its training sequence has about `length` tokens."""
    excess = prompts.token_lengths([record], tokenizer, style)[0] - length
    if excess <= 0 or not record.reasoning:
        return record
    ids = tokenizer(record.reasoning, add_special_tokens=False)["input_ids"]
    return dataclasses.replace(record, reasoning=tokenizer.decode(ids[: max(MIN_REASONING_TOKENS, len(ids) - excess)]))


def length_matched(n: int, tokenizer, style: prompts.PromptStyle, seed: int) -> list[Record]:
    """n bundled medical-o1 records whose lengths follow the real distribution, in seeded random order.

    The bundled items run longer than the real ones (median ~889 vs 670 tokens), so the i-th shortest target
    length takes the bundled record of the same rank and its reasoning is cut to fit.
    """
    records, _ = data.load_source(recipe.DatasetSource(path="bundled:medical-o1"))
    lengths = prompts.token_lengths(records, tokenizer, style)
    ranked = [records[i] for i in sorted(range(len(records)), key=lengths.__getitem__)]
    chosen = [_shorten(ranked[i * len(ranked) // n], length, tokenizer, style) for i, length in enumerate(real_lengths(n))]
    random.Random(seed).shuffle(chosen)
    return chosen


def padding_share(lengths: list[int], batch_size: int) -> float:
    """Share of the computed tokens that are padding when each batch is padded to its longest sequence."""
    batches = [lengths[i: i + batch_size] for i in range(0, len(lengths), batch_size)]
    return 1 - sum(lengths) / sum(max(b) * len(b) for b in batches)
