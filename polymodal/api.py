"""Entry points that read like the ecosystem's, each a thin layer over the library:

* ``SentenceTransformer``-style: ``polymodal.sentence_encoder("minilm").encode(["a", "b"])``
  (mean-pooled, L2-normalised sentence embeddings; ``models.encoder.SentenceEncoder``);
* open_clip-style: ``model, preprocess, tokenize = polymodal.create_model_and_transforms(path)``
  for a CLIP/ALIGN checkpoint or run folder: ``preprocess`` maps PIL images or paths to the
  model's pixels (its own size, mean/std and interpolation), ``tokenize`` maps texts to
  ``(ids, attention_mask)``; then ``model.encode_image(pixels)`` / ``model.encode_text(ids, mask)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence


def sentence_encoder(model: str | Path = "minilm", device: str = "cpu", max_length: int = 256,
                     pooling: str = "mean", normalize: bool = True):
    """A :class:`~polymodal.models.encoder.SentenceEncoder` (``.encode(sentences)``) for an encoder
    checkpoint, HF folder or alias (default: the bundled all-MiniLM-L6-v2)."""
    from .interop import load
    from .models.encoder import SentenceEncoder

    net, tok = load(model, device=device)
    if tok is None:
        raise ValueError(f"{model}: no tokenizer.json next to the weights")
    return SentenceEncoder(net.eval(), tok, max_length=max_length, pooling=pooling, normalize=normalize)


def create_model_and_transforms(model: str | Path, device: str = "cpu"):
    """(dual encoder in eval mode, image preprocess, text tokenize) like open_clip's function."""
    from .models.dual_encoder import load_dual_encoder, tokenize_texts

    net, tok, processor = load_dual_encoder(model, device=device)

    def tokenize(texts: str | Sequence[str]):
        return tokenize_texts(net, tok, [texts] if isinstance(texts, str) else list(texts))

    preprocess: Callable = processor
    return net.eval(), preprocess, tokenize
