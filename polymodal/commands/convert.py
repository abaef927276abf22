"""``polymodal convert``: any loadable checkpoint -> a polymodal or Hugging Face folder."""
from __future__ import annotations

from typing import Literal


def convert_cmd(out: str, src: str | None = None, to: Literal["polymodal", "hf"] = "polymodal",
                model_type: str | None = None) -> str:
    """Convert a checkpoint (polymodal folder, Hugging Face folder or .gguf) to a polymodal or HF folder.

    Args:
        out: the folder to write (replaced atomically if it exists).
        src: checkpoint folder or .gguf file (default: the bundled SmolLM2-135M-Instruct).
        to: "polymodal" (config.json with "family" + model.safetensors) or "hf" (loads in transformers).
        model_type: for --to hf, force the Hugging Face model_type (gpt2, llama, qwen2); default: inferred.
    """
    from ..interop import convert

    path = convert(src, out, to=to, model_type=model_type)
    print(f"wrote {path}")
    return str(path)
