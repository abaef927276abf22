"""Model families. Each file is a thin composition of ``polymodal.nn`` blocks."""
from .config import ConfigBase
from .gpt import GPT, GPTConfig, lm_loss

__all__ = ["ConfigBase", "GPT", "GPTConfig", "lm_loss"]
