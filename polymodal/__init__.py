"""polymodal: the GPT -> BERT -> CLIP -> VLM lineage from one set of transformer blocks."""
__version__ = "0.1.0"

from .models import GPT, GPTConfig  # noqa: E402


def __getattr__(name):  # heavy entry points load lazily so `import polymodal` stays fast
    if name == "load":
        from .interop import load
        return load
    if name == "generate":
        from .generate import generate
        return generate
    if name == "pipeline":
        from .pipelines import pipeline
        return pipeline
    if name in ("sentence_encoder", "create_model_and_transforms"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'polymodal' has no attribute {name!r}")
