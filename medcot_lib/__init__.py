"""medcot: medical chain-of-thought fine-tuning of open LLMs, one notebook per stage.

Educational and research software. Nothing it produces is fit for clinical use.
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "Educational and research use only. Not medical advice and not for clinical use: "
    "models, sample data and outputs from medcot must not inform the care of real patients."
)
