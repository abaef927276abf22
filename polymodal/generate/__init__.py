"""Text generation: one sampler (``sampler.py``), one decoding loop (``decode.py``).

``generate`` (batched, greedy / sampling / beam search), ``stream`` (token ids of one
prompt as they are produced), ``generate_text`` / ``stream_text`` (strings in, strings out).
"""
from .decode import generate, generate_text, stream, stream_text
from .sampler import LogitsProcessor, SamplingParams, sample_from_logits
from .seq2seq import generate_seq2seq

__all__ = ["generate", "generate_seq2seq", "generate_text", "stream", "stream_text", "LogitsProcessor", "SamplingParams",
           "sample_from_logits"]
