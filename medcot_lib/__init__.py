"""medcot: medical chain-of-thought fine-tuning of open LLMs, one notebook per stage.

Educational and research software. Nothing it produces is fit for clinical use.
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "Educational and research use only. Not medical advice and not for clinical use: "
    "models, sample data and outputs from medcot must not inform the care of real patients."
)


def _quiet_harmless_upstream_messages() -> None:
    """The one place where medcot hides upstream messages, each harmless here and named with its reason.

    - bitsandbytes (CPUs with AVX512-BF16) tries to fetch a faster 4-bit CPU kernel from the Hugging Face Hub through
      the optional `kernels` package and logs a warning when it cannot; its built-in kernel is used instead. medcot
      never downloads code at run time, so the warning can only ever say that.
    - peft 0.21.2 reads `model.is_gradient_checkpointing` when it wraps a model, which transformers 5 deprecates in
      favour of `is_activation_checkpointing` (a FutureWarning on every adapter load). medcot itself uses the new names.
    - The GGUF converter logs "Unknown RoPE type: default" for models with plain RoPE (Llama, SmolLM2): "default" needs
      no scaling metadata, which is what it writes.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    class _DropMessage(logging.Filter):
        def __init__(self, prefix: str):
            super().__init__()
            self.prefix = prefix

        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(self.prefix)

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
    logging.getLogger("hf-to-gguf").addFilter(_DropMessage("Unknown RoPE type: default"))


_quiet_harmless_upstream_messages()
