"""The export stage (05): merge the adapter, convert to GGUF, quantize, verify, and write deployment files.

One module per job, in the order the stage runs them:

- `inputs`: what the stage needs before heavy work (adapter, base checkpoint, GGUF tools, architecture,
  quantization types); `preflight` checks it all.
- `disk`: disk-space checks before a checkpoint or GGUF file is written.
- `paths`: where the stage writes (run_dir/export/...).
- `merging`: merge the adapter into a full-precision base (tied embeddings handled) and check the merge.
- `convert`: HF checkpoint -> F16/BF16 GGUF, and llama.cpp quantization.
- `gguf_info`: read a GGUF back: metadata, and the tensor types actually written.
- `verification`: every GGUF against the merged HF model: structure, greedy agreement, perplexity, speed.
- `ollama`: the Ollama template, stop strings and Modelfile.
- `card`: the Hub model card.
- `hub`: the push to the Hugging Face Hub.
- `stage`: step timings and the stage's metrics.

Everything the notebook and the other stages use is re-exported here: `from medcot_lib import export`,
then `export.merge(...)`, `export.verify(...)`, ...
"""

from .card import model_card, write_model_card
from .convert import GGUF_OUTTYPES, base_gguf, convert_all, quantize, to_gguf
from .disk import DISK_MARGIN, check_disk, checkpoint_parameters
from .gguf_info import K_QUANT_ROW, LOSSLESS_TYPES, gguf_metadata, tensor_type_table, tensor_types
from .hub import push
from .inputs import (
    INSTALL_HINT,
    NEEDS_IMATRIX,
    adapter_dir,
    adapter_summary,
    base_checkpoint,
    check_architecture,
    check_quant_types,
    export_dtype,
    preflight,
    quant_types,
    supported_architectures,
)
from .merging import MERGE_TOLERANCE, check_merge, ensure_merge_ok, merge
from .ollama import chat_segments, default_gguf, modelfile, ollama_template, stop_strings, write_modelfile
from .paths import EXPORT_DIR, gguf_path, merged_dir
from .stage import metrics, timed
from .verification import (
    HELD_OUT_TOKENS,
    MAX_PERPLEXITY_RATIO,
    NEAR_TIE_LOGITS,
    STRUCTURAL,
    ensure_usable,
    verification_table,
    verify,
    verify_file,
)

__all__ = [
    "DISK_MARGIN", "EXPORT_DIR", "GGUF_OUTTYPES", "HELD_OUT_TOKENS", "INSTALL_HINT", "K_QUANT_ROW",
    "LOSSLESS_TYPES", "MAX_PERPLEXITY_RATIO", "MERGE_TOLERANCE", "NEAR_TIE_LOGITS", "NEEDS_IMATRIX",
    "STRUCTURAL",
    "adapter_dir", "adapter_summary", "base_checkpoint", "base_gguf", "chat_segments", "check_architecture",
    "check_disk", "check_merge", "check_quant_types", "checkpoint_parameters", "convert_all", "default_gguf",
    "ensure_merge_ok", "ensure_usable", "export_dtype", "gguf_metadata", "gguf_path", "merge", "merged_dir",
    "metrics", "model_card", "modelfile", "ollama_template", "preflight", "push", "quant_types", "quantize",
    "stop_strings", "supported_architectures", "tensor_type_table", "tensor_types", "timed", "to_gguf",
    "verification_table", "verify", "verify_file", "write_model_card", "write_modelfile",
]
