"""T5's bucketed relative position bias (Raffel et al., 2020, "Exploring the Limits of
Transfer Learning with a Unified Text-to-Text Transformer", sec. 2.1; after Shaw et al., 2018).

Instead of adding position vectors to the input, every attention logit gets a learned
scalar that depends only on the offset between key and query:

    A_ij = q_i . k_j + b_h(bucket(j - i))          (no 1/sqrt(d) scaling in T5)

The offset r = j - i is mapped to one of ``num_buckets`` buckets:
* bidirectional (encoder): half the buckets for r <= 0, half for r > 0, by |r|;
  unidirectional (decoder, causal): only r <= 0 matters, by -r.
* Of a side's n buckets, the first n/2 hold the exact offsets 0 .. n/2-1; the rest
  cover n/2 .. ``max_distance`` in logarithmically growing ranges
      bucket = n/2 + floor(log(|r| / (n/2)) / log(max_distance / (n/2)) * (n - n/2)),
  and every |r| >= max_distance shares the last bucket (so the model extrapolates to
  longer sequences than it saw in training).

The bias is shared by all layers of a stack (T5 computes it in the first layer only)
and returned as an additive (1, H, T, S) tensor for ``polymodal.nn.Attention(bias=...)``.
This is the same function as Mesh TensorFlow's ``_relative_position_bucket`` and
Hugging Face's ``T5Attention._relative_position_bucket``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Integer offsets r = key_pos - query_pos -> bucket ids in [0, num_buckets)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets  # keys to the right: upper half
        r = relative_position.abs()
    else:
        r = (-relative_position).clamp(min=0)  # a causal query only ever sees r <= 0
    max_exact = num_buckets // 2
    is_small = r < max_exact
    # clamp(min=1): log(0) is never used (is_small covers it) but would warn on the cast
    large = max_exact + (
        torch.log(r.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, r, large)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head); ``weight`` is (num_buckets, n_head) like HF's
    ``relative_attention_bias.weight``."""

    def __init__(self, n_head: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        if num_buckets < (4 if bidirectional else 2):
            raise ValueError(f"num_buckets={num_buckets} is too small for a {'bi' if bidirectional else 'uni'}"
                             "directional relative bias")
        self.n_head = n_head
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.zeros(num_buckets, n_head))
        nn.init.normal_(self.weight, std=0.02)

    def buckets(self, t: int, s: int | None = None, start: int = 0) -> torch.Tensor:
        """(t, s) bucket ids for query positions start..start+t-1 and key positions 0..s-1."""
        s = start + t if s is None else s
        q = torch.arange(start, start + t, device=self.weight.device)[:, None]
        k = torch.arange(s, device=self.weight.device)[None, :]
        return relative_position_bucket(k - q, self.bidirectional, self.num_buckets, self.max_distance)

    def forward(self, t: int, s: int | None = None, start: int = 0) -> torch.Tensor:
        """Additive bias (1, H, t, s). With a KV cache, ``start`` is the number of cached
        positions: the new queries start..start+t-1 attend to keys 0..start+t-1."""
        return F.embedding(self.buckets(t, s, start), self.weight).permute(2, 0, 1)[None]
