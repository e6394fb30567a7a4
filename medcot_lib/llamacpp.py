"""Many prompts decoded together by llama.cpp, through llama-cpp-python's C API (continuous batching).

llama-cpp-python's `Llama` class decodes one sequence at a time. On a CPU that leaves most of the
arithmetic units idle: each token reads every weight once. Here up to `parallel` sequences share
each forward pass, each in its own KV-cache slot; a finished sequence's slot is refilled with the
next prompt at once, so the batch stays full until the queue runs dry.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MedcotError

PREFILL_CHUNK = 512  # prompt tokens fed per forward pass (a MedQA prompt of ~200 tokens fits in one)
BUSY_PERCENT = 50  # a core this busy (over IDLE_PROBE_S) is taken by someone else
IDLE_PROBE_S = 0.2


@contextlib.contextmanager
def captured_log() -> Iterator[io.StringIO]:
    """Collect llama.cpp's log lines instead of printing them.

    llama-cpp-python prints llama.cpp's log to sys.stderr from a callback; its level mapping does not match
    llama.cpp's current levels (warnings arrive as errors), so filtering by level would hide real errors.
    We capture everything and show it only when a call fails.
    """
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.NOTSET)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        logger.setLevel(level)


def log_tail(buffer: io.StringIO, lines: int = 8) -> str:
    useful = [line for line in buffer.getvalue().splitlines() if line.strip() and "ncols" not in line]
    return "\n    ".join(useful[-lines:]) or "(llama.cpp logged nothing)"


def llama_threads() -> int:
    """Threads for llama.cpp: the cores of this process's affinity that are idle right now (at least one).

    ggml's workers spin at every barrier, so a thread on a core that another process (or torch's OpenMP
    pool) holds makes each token wait on a descheduled thread: 0.5 instead of 130 tokens/s for a Q8_0 file
    when both cores of a shared 2-core machine were requested and one was busy. On an idle machine every
    core is used (F16, 16 parallel MedQA prompts: 2 threads 8.9 s, 1 thread 16.6 s).
    """
    import psutil

    cores = sorted(os.sched_getaffinity(0))
    usage = psutil.cpu_percent(interval=IDLE_PROBE_S, percpu=True)
    return max(1, sum(1 for core in cores if core < len(usage) and usage[core] < BUSY_PERCENT))


def open_chat_model(path: str | Path, n_ctx: int, seed: int):
    """llama-cpp-python's `Llama`, for chat completions through the GGUF's own chat template (one sequence at a time)."""
    from llama_cpp import Llama

    # n_batch: prompt tokens evaluated per forward pass; 512 keeps a MedQA prompt to one pass.
    threads = llama_threads()
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=PREFILL_CHUNK, n_threads=threads, n_threads_batch=threads,
                 seed=seed, verbose=False)


@dataclass
class _Slot:
    index: int  # which prompt
    feed: list[int]  # tokens still to put through the model
    pos: int = 0
    new: list[int] = field(default_factory=list)
    rng: np.random.Generator | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int


def pick_token(logits: np.ndarray, sampling: Sampling | None, rng: np.random.Generator | None) -> int:
    """Greedy (argmax), or temperature + nucleus sampling (no top-k, no min-p, no repetition penalty, as in HF)."""
    if sampling is None:
        return int(np.argmax(logits))
    scaled = (logits - logits.max()) / sampling.temperature
    probs = np.exp(scaled, dtype=np.float64)
    probs /= probs.sum()
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


class ParallelGGUF:
    """A GGUF model with `parallel` KV-cache slots of `slot_tokens` each. Use as a context manager."""

    def __init__(self, path: str | Path, *, parallel: int, slot_tokens: int, threads: int | None = None):
        import llama_cpp as ll

        self.ll, self.parallel = ll, parallel
        with captured_log() as log:  # llama.cpp's load log is shown only when loading fails
            self._load(path, parallel, slot_tokens, threads, log)

    def _load(self, path: str | Path, parallel: int, slot_tokens: int, threads: int | None, log: io.StringIO) -> None:
        ll = self.ll
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(str(path).encode(), ll.llama_model_default_params())
        if not self.model:
            raise MedcotError(f"{path}: llama.cpp cannot load this GGUF file:\n    {log_tail(log)}")
        params = ll.llama_context_default_params()
        params.n_seq_max = parallel
        params.n_ctx = parallel * slot_tokens
        params.n_batch = params.n_ubatch = max(PREFILL_CHUNK, parallel)
        # One KV buffer shared by all sequences (each still attends only to its own cells). With a buffer per
        # sequence, llama.cpp splits a decode into one pass per contiguous run of sequence ids, so once some
        # sequences finish, 7 scattered ones took 61 ms a step instead of 24 (2 cores, F16, medcot bench).
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads or llama_threads()
        self.ctx = ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise MedcotError(f"{path}: llama.cpp cannot create a context for {parallel} x {slot_tokens} tokens:\n    {log_tail(log)}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(params.n_batch, 0, 1)
        self.capacity = params.n_batch

    def __enter__(self) -> ParallelGGUF:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.ctx:
            with captured_log():  # freeing a context logs its buffer sizes
                self.ll.llama_batch_free(self.batch)
                self.ll.llama_free(self.ctx)
                self.ll.llama_model_free(self.model)
            self.ctx = None

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self.ll.llama_vocab_is_eog(self.vocab, token))

    def _fill_batch(self, slots: dict[int, _Slot]) -> dict[int, int]:
        """Put each slot's next tokens into the batch; return {slot: batch row whose logits it needs}."""
        n, wanted = 0, {}
        for seq, slot in slots.items():
            room = self.capacity - n
            if room <= 0:
                break
            take = slot.feed[:room]
            for j, token in enumerate(take):
                self.batch.token[n] = token
                self.batch.pos[n] = slot.pos + j
                self.batch.n_seq_id[n] = 1
                self.batch.seq_id[n][0] = seq
                self.batch.logits[n] = j == len(take) - 1 and len(take) == len(slot.feed)
                n += 1
            slot.pos += len(take)
            slot.feed = slot.feed[len(take):]
            if not slot.feed:
                wanted[seq] = n - 1
        self.batch.n_tokens = n
        return wanted

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None = None,
                 progress=None) -> list[tuple[list[int], bool]]:
        """(new token ids, stopped at an end-of-generation token) per prompt, in input order."""
        queue = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))  # longest first: fewer stragglers
        results: list[tuple[list[int], bool] | None] = [None] * len(prompts)
        slots: dict[int, _Slot] = {}
        while queue or slots:
            for seq in range(self.parallel):
                if seq not in slots and queue:
                    i = queue.popleft()
                    self.ll.llama_memory_seq_rm(self.memory, seq, -1, -1)
                    rng = np.random.default_rng([sampling.seed, i]) if sampling else None
                    slots[seq] = _Slot(i, list(prompts[i]), rng=rng)
            wanted = self._fill_batch(slots)
            if self.ll.llama_decode(self.ctx, self.batch) != 0:
                raise MedcotError("llama.cpp decode failed (KV cache full?): lower generation_batch_size or max_new_tokens")
            for seq, row in wanted.items():
                slot = slots[seq]
                logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
                token = pick_token(logits, sampling, slot.rng)
                slot.new.append(token)
                stopped = self.is_end_of_generation(token)
                if stopped or len(slot.new) >= max_new_tokens:
                    results[slot.index] = (slot.new, stopped)
                    del slots[seq]
                    if progress:
                        progress.update(1)
                else:
                    slot.feed = [token]
        return results

    def stream(self, prompt: list[int], max_new_tokens: int, sampling: Sampling | None = None) -> Iterator[int]:
        """One prompt's new token ids as they are decoded, in slot 0 (the chat app, stage 06).

        Decoding is `generate`'s for a single prompt (its sampling stream included); the end-of-generation token
        ends the stream and is not yielded.
        """
        self.ll.llama_memory_seq_rm(self.memory, 0, -1, -1)
        slots = {0: _Slot(0, list(prompt), rng=np.random.default_rng([sampling.seed, 0]) if sampling else None)}
        slot = slots[0]
        while len(slot.new) < max_new_tokens:
            wanted = self._fill_batch(slots)
            if self.ll.llama_decode(self.ctx, self.batch) != 0:
                raise MedcotError("llama.cpp decode failed (KV cache full?): lower max_new_tokens")
            if 0 not in wanted:  # a prompt longer than one batch: feed the rest first
                continue
            logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, wanted[0]), shape=(self.n_vocab,))
            token = pick_token(logits, sampling, slot.rng)
            slot.new.append(token)
            if self.is_end_of_generation(token):
                return
            yield token
            slot.feed = [token]
