"""The models a server holds, by kind: text generation, sentence embeddings, CLIP.

``ServedModel.load(spec)`` takes ``name=path`` or a path (the name is then the
folder or file stem; None = SmolLM2-135M-Instruct) and picks the kind from the
loaded class:

* ``generate``: a causal LM (``GPT``) with its tokenizer, run by a ``Scheduler``;
* ``embed``: a text encoder (BERT/MiniLM family) through ``SentenceEncoder``
  (mean pooling + L2 normalisation, as all-MiniLM-L6-v2's sentence-transformers
  modules do);
* ``clip``: ``CLIP.encode_text`` / ``encode_image`` (L2-normalised) with the
  ``ImageProcessor`` built from the model's own config; the text tower is a causal CLIP text
  transformer or a BERT/MiniLM encoder tower (``models.dual_encoder.tokenize_texts`` pads either).

* ``generate`` with ``vision = True``: a generative VLM (``models.vlm.VLM``: image tower ->
  projector -> decoder); chat ``image_url`` parts become ``config.image_token`` in the prompt,
  expanded to the placeholder ids by ``VLM.prompt_ids``, with the images preprocessed by
  the ``ImageProcessor`` of the VLM's vision config.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch


class ServedModel:
    def __init__(self, name: str, kind: str, model, tokenizer, context: int | None = None):
        self.name, self.kind, self.model, self.tokenizer = name, kind, model, tokenizer
        self.context = context
        self.scheduler = None
        from ..models.vlm import VLM

        self.vision = isinstance(model, VLM)
        self.lock = threading.Lock()  # embedding models run one batch at a time
        self.encoder = None
        self.image_processor = None
        if kind == "embed":
            from ..models.encoder import SentenceEncoder

            self.encoder = SentenceEncoder(model, tokenizer)
        elif kind == "clip" or self.vision:
            from ..data.images import ImageProcessor

            self.image_processor = ImageProcessor.from_config(model.config)

    @classmethod
    def load(cls, spec: str | None, device: str = "cpu", dtype: str | None = None,
             context: int | None = None, quantize: str | None = None, name: str | None = None) -> "ServedModel":
        """``spec``: ``NAME=PATH`` or ``PATH`` (any ``--model`` the other commands accept: a model
        folder, a .gguf file, a training run folder, an alias such as ``smollm2``) or None for
        SmolLM2-135M-Instruct; ``name`` (``--served-model-name``) overrides the name."""
        from ..interop import load, resolve_model_path

        path = spec
        if spec and "=" in spec and not Path(spec).exists():
            given, path = spec.split("=", 1)
            name = name or given
        if path is None:
            name = name or "SmolLM2-135M-Instruct"
        else:
            p = Path(path)
            name = name or (p.stem if p.is_file() else p.name)
            path = resolve_model_path(path)  # a run folder -> its model/ (or latest checkpoint)
        model, tok = load(path, device=device, dtype=dtype)
        model.eval()
        if quantize not in (None, "none"):
            from ..inference import quantize as quantize_weights
            from ..models.gpt import GPT

            if isinstance(model, GPT):  # weight-only int8/int4 (polymodal.inference.quant)
                # int4 keeps lm_head in int8: an int4 output projection changes SmolLM2's greedy text
                quantize_weights(model, quantize, modes={"lm_head": "int8"} if quantize == "int4" else None)
        return cls.from_model(name, model, tok, context=context)

    @classmethod
    def from_model(cls, name: str, model, tokenizer, context: int | None = None) -> "ServedModel":
        from ..models.clip import CLIP
        from ..models.gpt import GPT
        from ..models.vlm import VLM

        if isinstance(model, (GPT, VLM)):
            kind = "generate"
            if tokenizer is None:
                raise ValueError(f"model {name!r} has no tokenizer files; the server needs one to read text")
            context = min(context or model.config.block_size, model.config.block_size)
        elif isinstance(model, CLIP):
            kind = "clip"
        elif hasattr(model, "config") and type(model.config).__name__ == "EncoderConfig" or hasattr(model, "encoder"):
            kind = "embed"
        else:
            raise ValueError(f"model {name!r} ({type(model).__name__}) is not servable: expected a causal LM, "
                             "a text encoder or CLIP")
        if kind != "generate" and tokenizer is None:
            raise ValueError(f"model {name!r} has no tokenizer files")
        return cls(name, kind, model, tokenizer, context)

    # -- embeddings ------------------------------------------------------------------------
    def embed_texts(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """(N, D) float32 embeddings and the number of tokens read."""
        with self.lock, torch.inference_mode():
            if self.kind == "embed":
                n_tok = sum(len(x) for x in self.encoder.tokenize(texts))
                return self.encoder.encode(texts, workers=1), n_tok
            from ..models.dual_encoder import tokenize_texts  # what zero-shot and retrieve feed the model

            batch, mask = tokenize_texts(self.model, self.tokenizer, texts)
            dev = next(self.model.parameters()).device
            z = self.model.encode_text(batch.to(dev), mask.to(dev), normalize=True)
            return z.float().cpu(), int(mask.sum())

    def embed_images(self, images) -> torch.Tensor:
        with self.lock, torch.inference_mode():
            dev = next(self.model.parameters()).device
            px = self.image_processor(images).to(dev, next(self.model.parameters()).dtype)
            return self.model.encode_image(px, normalize=True).float().cpu()

    def pixel_values(self, images) -> torch.Tensor:
        """PIL images -> (1, M, C, H, W): one request's images, in prompt order."""
        p = next(self.model.parameters())
        return self.image_processor(images).to(p.device, p.dtype)[None]

    def info(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "polymodal",
                "kind": self.kind, "vision": self.vision, "context_length": self.context}


def load_served(specs: list[str | None], names: list[str] | None = None, chat_template: str | None = None,
                **load_kw) -> list[ServedModel]:
    """``ServedModel.load`` of each ``--model`` spec; ``names`` (``--served-model-name``) rename
    them in order; ``chat_template`` (the text of a Jinja2 file) replaces the generative models'."""
    if names and len(names) != len(specs):
        raise ValueError(f"--served-model-name gives {len(names)} names for {len(specs)} --model values; "
                         "give one name per model, in order")
    served = [ServedModel.load(s, name=names[i] if names else None, **load_kw) for i, s in enumerate(specs)]
    if chat_template is not None:
        for sm in served:
            if sm.kind == "generate":
                sm.tokenizer.chat_template = chat_template
    return served
