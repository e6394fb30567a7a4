"""`medcot bench export`: merge, F16 GGUF, each quantization and the verification, timed step by step."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .. import data, models, train
from .generate import _quiet_llama
from .measure import Stopwatch
from .settings import EXPORT_SECONDS, PARAMS, Sizes, _recipe
from .stats import alternate, summarize, target


def _export_run_dir(cfg, run_dir: Path) -> None:
    """A run directory as stage 05 finds it: prepared data (stage 00) and an (untrained) adapter (stage 03)."""
    data.save_prepared(data.prepare(cfg, run_dir), run_dir)
    model = train.add_adapter(cfg, models.load_model(cfg))
    model.save_pretrained(run_dir / "adapter")
    models.load_tokenizer(cfg.model_name_or_path).save_pretrained(run_dir / "adapter")


def bench_export(sizes: Sizes, repeats: int) -> dict:
    """merge + F16 GGUF + each quantization + verification, timed step by step."""
    from .. import export

    overrides = {"gguf_agreement_tokens": sizes.export_tokens} if sizes.export_tokens else {}
    cfg = _recipe(**overrides)
    with tempfile.TemporaryDirectory(prefix="medcot-bench-export-") as tmp:
        run_dir = Path(tmp)
        _export_run_dir(cfg, run_dir)
        held_out = data.load_prepared(run_dir).get("test", [])[: sizes.export_held_out]

        def run() -> dict:
            timings: dict = {}
            with Stopwatch() as clock, _quiet_llama():
                with export.timed(timings, "merge"):
                    export.merge(cfg, run_dir)
                files = export.convert_all(cfg, run_dir, timings)
                with export.timed(timings, "verify"):
                    report = export.verify(cfg, run_dir, files, held_out)
            return {"seconds": clock.seconds, **timings, "flagged": len(report["flagged"])}

        runs = alternate({"export": run}, repeats)
    total = summarize(runs["export"])["seconds"]
    return {"settings": {"recipe": PARAMS, "outtype": cfg.gguf_outtype, "quant_types": cfg.gguf_quant_types,
                         "agreement_tokens": cfg.gguf_agreement_tokens, "held_out_records": len(held_out),
                         "adapter": "fresh LoRA adapter (untrained: the merge does the same work)",
                         "excluded": "installing the gguf extra, loading the libraries, writing the run directory"},
            "sides": runs, "targets": [target("export: merge + GGUF + 3 quantizations + verification", total, "<=",
                                              EXPORT_SECONDS, " s")]}
