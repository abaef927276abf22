"""Generation for encoder-decoder models (T5, BART) through the package's one decoding loop.

The source is encoded once; the decoder is wrapped so that ``generate`` sees an
ordinary causal LM whose every call also receives the encoder memory
(``model_kwargs``), and whose cache holds the cross-attention K/V computed once.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..models.seq2seq import Seq2Seq, Seq2SeqCache
from .decode import generate


class _DecoderLM(nn.Module):
    """Presents the decoder as the causal LM that ``polymodal.generate`` drives: the encoder
    memory arrives through ``model_kwargs`` (which generation expands to beams), the cross K/V
    live in the cache after the first call."""

    def __init__(self, model: Seq2Seq):
        super().__init__()
        self.model = model
        self.config = model.config

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Seq2SeqCache:
        return self.model.new_cache(batch_size, max_len)

    def forward(self, input_ids, attention_mask=None, cache=None, last_only=False, memory=None, memory_mask=None):
        if attention_mask is not None and not bool(attention_mask.all()):
            # Target prefixes are positions 0.. of the target; left padding would shift them.
            raise ValueError("seq2seq decoder prompts must all have the same length")
        return self.model.decode(input_ids, memory, memory_mask, cache, last_only)


def generate_seq2seq(model: Seq2Seq, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     max_new_tokens: int, decoder_input_ids: Sequence[Sequence[int]] | None = None,
                     **kw) -> list[list[int]]:
    """Encodes the source batch once and generates each target with ``polymodal.generate.generate``
    (the package's one sampler: penalties, greedy/sampling, beam search with ``length_penalty`` and
    ``no_repeat_ngram_size``). Targets start from ``decoder_start_token_id`` unless
    ``decoder_input_ids`` (a forced prefix per row, all of one length) is given. Returns the new
    target tokens per row, EOS excluded. Other keyword arguments are ``generate``'s."""
    c = model.config
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    b = input_ids.shape[0]
    prompts = [list(p) for p in decoder_input_ids] if decoder_input_ids is not None else [[c.decoder_start_token_id]] * b
    if len(prompts) != b:
        raise ValueError(f"{len(prompts)} decoder prompts for {b} source rows")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            memory = model.encode(input_ids, attention_mask)
        mk: dict[str, Any] = {"memory": memory}
        if attention_mask is not None and not bool(attention_mask.all()):
            mk["memory_mask"] = attention_mask
        kw.setdefault("pad_token_id", c.pad_token_id if c.pad_token_id is not None else 0)
        if kw.get("eos_token_id") is None and kw.get("tokenizer") is None:
            kw["eos_token_id"] = c.eos_token_id if c.eos_token_id is not None else []
        return generate(_DecoderLM(model), prompts, max_new_tokens=max_new_tokens, model_kwargs=mk, **kw)
    finally:
        model.train(was_training)


def generate_seq2seq_texts(model: Seq2Seq, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
                           max_src_len: int = 512, batch_size: int = 32, **kw) -> list[str]:
    """Strings in, strings out (translation, summarisation): each source is encoded with EOS and
    truncated to ``max_src_len`` tokens, sources of similar length are decoded together (less
    padding), and the outputs come back in input order, one line each. Other keyword arguments
    are :func:`generate_seq2seq`'s (``num_beams``, ``length_penalty``, ``no_repeat_ngram_size``...)."""
    from ..data.pairs import encode_texts, pad_sources

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    ids = encode_texts(tokenizer, texts, max_src_len)
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id or 0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        src, mask = pad_sources([ids[i] for i in idx], pad_id)
        gen = generate_seq2seq(model, src.to(device), mask.to(device), max_new_tokens=max_new_tokens, **kw)
        for i, row in zip(idx, gen):
            out[i] = tokenizer.decode(row).strip().replace("\n", " ")
    return out
