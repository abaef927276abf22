"""The encoder-decoder family: T5 and BART.

An encoder-decoder models p(y | x) = prod_t p(y_t | y_<t, x) (Vaswani et al., 2017,
sec. 3): a bidirectional encoder turns the source x into a memory M, and a causal
decoder reads its own prefix (self-attention) and M (cross-attention,
softmax(Q_dec K_M^T / sqrt(d)) V_M). Both stacks are ``polymodal.nn.Block``; the
decoder's blocks have ``cross=True``.

| preset        | norm              | placement | positions                  | FFN        | head                         | paper / config |
|---------------|-------------------|-----------|----------------------------|------------|------------------------------|----------------|
| t5-small      | RMSNorm, no bias  | pre       | relative bias (buckets)    | ReLU       | tied, h * d_model^-0.5       | Raffel et al. 2020; google-t5/t5-small config.json |
| t5-v1_1-small | RMSNorm, no bias  | pre       | relative bias (buckets)    | gated GELU | untied                       | T5 v1.1 (Shazeer 2020 GeGLU); google/t5-v1_1-small config.json |
| bart-base     | LayerNorm         | post      | learned, offset 2          | GELU       | tied + final_logits_bias     | Lewis et al. 2019; facebook/bart-base config.json |

T5 details: no 1/sqrt(d) attention scaling (the scale is folded into the
initialisation), no biases anywhere, the relative bias is computed by the first
layer of each stack and shared by all its layers, cross-attention has no position
bias, and both stacks end with a final RMSNorm. BART details: embeddings (times
sqrt(d) when ``embed_scale``) plus learned positions (looked up at position + 2,
a fairseq legacy), then ``layernorm_embedding``; post-norm blocks; no final norm.

Decoding: the cross-attention K/V of the encoder memory do not change while the
target grows, so :class:`Seq2SeqCache` computes them ONCE per sequence (at the first
decode call) and every later step reuses them; only the decoder self-attention K/V
grow by one token per step. ``polymodal.generate.generate_seq2seq`` drives the package's
one sampler and beam search with the encoder memory as ``model_kwargs``.

Pre-training objectives (data functions, pure Python on token ids):
* :func:`span_corrupt`: T5 span corruption (Raffel et al. 2020, sec. 3.1.4);
* :func:`text_infill`: BART text infilling (Lewis et al. 2019, sec. 2.2).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from ..nn.init import normal_init_

from ..nn import Block, KVCache, LearnedPositions, RelativePositionBias, build_mask, make_norm
from .config import ConfigBase


@dataclasses.dataclass
class Seq2SeqConfig(ConfigBase):
    family: ClassVar[str] = "seq2seq"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    variant: str = "t5"  # t5 | bart: which Hugging Face class an export targets
    vocab_size: int = 32128
    n_embd: int = 512  # d_model
    n_head: int = 8
    head_dim: int | None = None  # T5's d_kv; default n_embd // n_head
    intermediate_size: int = 2048  # d_ff / ffn_dim
    n_layer: int = 6  # encoder layers
    n_decoder_layer: int | None = None  # default n_layer
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    prenorm: bool = True
    mlp: str = "plain"  # plain | gated
    activation: str = "relu"
    bias: bool = False  # biases of every Linear and norm (T5: none; BART: all)
    attn_scale: float | None = 1.0  # T5: no 1/sqrt(d); None = 1/sqrt(head_dim)
    position: str = "relative"  # relative | learned
    relative_buckets: int = 32
    relative_max_distance: int = 128
    block_size: int | None = None  # longest sequence (learned positions); None = no limit (relative)
    position_offset: int = 2  # BART looks up position p at row p + 2
    embed_norm: bool = False  # BART's layernorm_embedding
    embed_scale: bool = False  # multiply token embeddings by sqrt(n_embd)
    final_norm: bool = True  # T5's final_layer_norm on both stacks
    tie_embeddings: bool = True
    rescale_output: bool = True  # T5 with a tied head: decoder output * n_embd**-0.5 before lm_head
    final_logits_bias: bool = False  # BART: a (1, vocab) buffer added to the logits
    dropout: float = 0.1
    init_std: float = 0.02
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    bos_token_id: int | None = None
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.variant not in ("t5", "bart"):
            raise ValueError(f"variant must be 't5' or 'bart', got {self.variant!r}")
        if self.position not in ("relative", "learned"):
            raise ValueError(f"position must be 'relative' or 'learned', got {self.position!r}")
        if self.position == "learned" and not self.block_size:
            raise ValueError("learned positions need block_size (the table's length)")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim")

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def n_dec(self) -> int:
        return self.n_decoder_layer or self.n_layer


def _register(name: str, **kw):
    Seq2SeqConfig.presets[name] = kw


_t5 = dict(variant="t5", norm="rmsnorm", norm_eps=1e-6, prenorm=True, bias=False, attn_scale=1.0,
           position="relative", relative_buckets=32, relative_max_distance=128, final_norm=True,
           pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout=0.1)
# google-t5/t5-small config.json (feed_forward_proj "relu", tied embeddings)
_register("t5-small", vocab_size=32128, n_embd=512, n_head=8, head_dim=64, intermediate_size=2048, n_layer=6,
          mlp="plain", activation="relu", tie_embeddings=True, rescale_output=True, **_t5)
# google/t5-v1_1-small config.json (feed_forward_proj "gated-gelu" = gelu_new, untied lm_head)
_register("t5-v1_1-small", vocab_size=32128, n_embd=512, n_head=6, head_dim=64, intermediate_size=1024, n_layer=8,
          mlp="gated", activation="gelu_tanh", tie_embeddings=False, rescale_output=False, **_t5)
_bart = dict(variant="bart", norm="layernorm", norm_eps=1e-5, prenorm=False, bias=True, attn_scale=None,
             position="learned", position_offset=2, embed_norm=True, final_norm=False, mlp="plain",
             activation="gelu", tie_embeddings=True, rescale_output=False, final_logits_bias=True,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=0.1)
# facebook/bart-base config.json
_register("bart-base", vocab_size=50265, n_embd=768, n_head=12, intermediate_size=3072, n_layer=6, block_size=1024,
          embed_scale=False, **_bart)
# CPU-sized presets (a shared 8k vocabulary suits Multi30k / BBC-sized corpora).
_register("t5-tiny", vocab_size=8000, n_embd=256, n_head=4, head_dim=64, intermediate_size=1024, n_layer=3,
          mlp="plain", activation="relu", tie_embeddings=True, rescale_output=True, **_t5)
_register("t5-v1_1-tiny", vocab_size=8000, n_embd=256, n_head=4, head_dim=64, intermediate_size=683, n_layer=3,
          mlp="gated", activation="gelu_tanh", tie_embeddings=False, rescale_output=False, **_t5)
_register("bart-tiny", vocab_size=8000, n_embd=256, n_head=4, intermediate_size=1024, n_layer=3, block_size=512,
          embed_scale=True, **_bart)


class Seq2SeqCache(KVCache):
    """Decoder self-attention K/V (grow by one token per step, as ``KVCache``) plus the
    cross-attention K/V of the encoder memory, per decoder layer, set once by the first
    decode call and reused by every later step."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.memory_valid: torch.Tensor | None = None  # (B, S) bool, None = no padding

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        if self.memory_kv is not None:
            self.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory_kv]
        if self.memory_valid is not None:
            self.memory_valid = self.memory_valid.index_select(0, index)


class Stack(nn.Module):
    """One side (encoder or decoder): embeddings' position/normalisation, blocks, final norm."""

    def __init__(self, c: Seq2SeqConfig, decoder: bool):
        super().__init__()
        n = c.n_dec if decoder else c.n_layer
        self.rel_bias = None
        self.wpe = None
        if c.position == "relative":
            self.rel_bias = RelativePositionBias(c.n_head, c.relative_buckets, c.relative_max_distance,
                                                 bidirectional=not decoder)
        else:
            self.wpe = LearnedPositions(c.block_size + c.position_offset, c.n_embd)
        self.ln_emb = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias) if c.embed_norm else None
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.intermediate_size, head_dim=c.hd, norm=c.norm, norm_eps=c.norm_eps,
                  norm_bias=c.bias, mlp=c.mlp, act=c.activation, qkv_bias=c.bias, out_bias=c.bias, mlp_bias=c.bias,
                  prenorm=c.prenorm, cross=decoder, dropout=c.dropout, attn_scale=c.attn_scale, layer_idx=i)
            for i in range(n)
        )
        self.ln_f = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias) if c.final_norm else None


def _key_padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 1/0 -> (B, 1, 1, S) bool, or None when nothing is padding (lets SDPA skip masking)."""
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    return None if bool(mask.all()) else mask[:, None, None, :]


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.n_embd)  # shared by encoder, decoder (and lm_head if tied)
        self.encoder = Stack(c, decoder=False)
        self.decoder = Stack(c, decoder=True)
        self.drop = nn.Dropout(c.dropout)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(1, c.vocab_size))
        else:
            self.final_logits_bias = None
        self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        normal_init_(self, self.config.init_std)
        if self.config.rescale_output:
            # T5 multiplies the decoder output by d**-0.5 before the tied head, so its embedding
            # rows are O(1) (Mesh TF initialises them with std 1.0).
            nn.init.normal_(self.embed.weight, std=1.0)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  device=None) -> Seq2SeqCache:
        """A cache for ``max_len`` decoder tokens (default ``block_size``, or 512 without a limit)."""
        c = self.config
        p = self.embed.weight
        return Seq2SeqCache(c.n_dec, batch_size, c.n_head, c.hd, max_len or c.block_size or 512,
                            dtype or (p.dtype if p.is_floating_point() else torch.float32), device or p.device)

    def _embed(self, stack: Stack, ids: torch.Tensor, start: int) -> torch.Tensor:
        c = self.config
        x = self.embed(ids)
        if c.embed_scale:
            x = x * math.sqrt(c.n_embd)
        if stack.wpe is not None:
            t = ids.shape[1]
            if start + t > c.block_size:
                raise ValueError(f"sequence of {start + t} tokens is longer than the model's learned positions "
                                 f"({c.block_size}, config.block_size)")
            pos = torch.arange(start, start + t, device=ids.device) + c.position_offset
            x = x + stack.wpe(pos)[None].to(x.dtype)
        if stack.ln_emb is not None:
            x = stack.ln_emb(x)
        return self.drop(x)

    def _finish(self, stack: Stack, x: torch.Tensor) -> torch.Tensor:
        if stack.ln_f is not None:
            x = stack.ln_f(x)
        return self.drop(x)

    # -- encoder -------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source tokens (B, S) (right-padded; ``attention_mask`` 1 = real token) -> memory (B, S, d)."""
        x = self._embed(self.encoder, input_ids, 0)
        s = input_ids.shape[1]
        mask = _key_padding(attention_mask)  # padding keys are never attended to
        bias = self.encoder.rel_bias(s, s) if self.encoder.rel_bias is not None else None  # shared by all layers
        for blk in self.encoder.blocks:
            x = blk(x, mask, bias=bias)
        return self._finish(self.encoder, x)

    # -- decoder -------------------------------------------------------------------------------
    def decode_hidden(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor | None,
                      memory_mask: torch.Tensor | None = None, cache: Seq2SeqCache | None = None,
                      decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final decoder hidden states (B, T, d). With a cache, pass only the new tokens;
        ``memory`` may then be None after the first call (its K/V are in the cache)."""
        d = self.decoder
        t = decoder_input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        x = self._embed(d, decoder_input_ids, start)

        # Self-attention mask: causal over slots 0..start+t-1, minus padded decoder slots.
        if cache is not None:
            cache.reserve(t, decoder_attention_mask)
            key_valid = cache.key_valid[:, : start + t] if cache.has_padding else None
        else:
            key_valid = decoder_attention_mask.to(torch.bool) if (
                decoder_attention_mask is not None and not bool(decoder_attention_mask.all())) else None
        bias = d.rel_bias(t, start + t, start) if d.rel_bias is not None else None
        is_causal = False
        if key_valid is None and t == 1:
            mask = None  # one new query sees every cached key
        elif key_valid is None and bias is None and start == 0:
            mask, is_causal = None, True  # SDPA's causal kernel (an additive bias would disable it)
        else:
            mask = build_mask("causal", torch.arange(start, start + t, device=x.device),
                              torch.arange(start + t, device=x.device), key_valid)

        # Cross-attention: the memory's K/V, once per sequence when caching.
        if cache is not None:
            if cache.memory_kv is None:
                if memory is None:
                    raise ValueError("the first decode step with a fresh cache needs the encoder memory")
                cache.memory_kv = [blk.cross_attn.project_memory(memory) for blk in d.blocks]
                cache.memory_valid = None if memory_mask is None or bool(memory_mask.all()) else memory_mask.to(torch.bool)
            memory_kv = cache.memory_kv
            mmask = cache.memory_valid[:, None, None, :] if cache.memory_valid is not None else None
        else:
            if memory is None:
                raise ValueError("decoding without a cache needs the encoder memory")
            memory_kv = [blk.cross_attn.project_memory(memory) for blk in d.blocks]
            mmask = _key_padding(memory_mask)

        for blk, kv in zip(d.blocks, memory_kv):
            x = blk(x, mask, is_causal=is_causal, cache=cache, bias=bias, memory_kv=kv, memory_mask=mmask)
        if cache is not None:
            cache.advance(t)
        return self._finish(d, x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.config.rescale_output:
            h = h * self.config.n_embd ** -0.5  # T5 (tied head): keeps the logits O(1)
        out = self.lm_head(h)
        if self.final_logits_bias is not None:
            out = out + self.final_logits_bias.to(out.dtype)
        return out

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor | None,
               memory_mask: torch.Tensor | None = None, cache: Seq2SeqCache | None = None,
               last_only: bool = False, decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of the next target token; (B, 1, vocab) with ``last_only``."""
        h = self.decode_hidden(decoder_input_ids, memory, memory_mask, cache, decoder_attention_mask)
        return self.logits(h[:, -1:] if last_only else h)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                last_only: bool = False, cache=None) -> torch.Tensor:
        """Teacher-forced logits (B, T, vocab): encode the source, decode ``decoder_input_ids``
        (the targets shifted right, see :func:`shift_right`)."""
        if cache is not None:
            raise ValueError("an encoder-decoder generates with polymodal.generate.generate_seq2seq(model, input_ids, attention_mask, "
                             "...) (or model.encode + model.decode with a cache), not generate(model, ...)")
        if decoder_input_ids is None:
            raise ValueError("Seq2Seq.forward needs decoder_input_ids (targets shifted right: shift_right(labels, ...))")
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, None, last_only, decoder_attention_mask)

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
             ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of ``labels`` (B, T) (``ignore_index`` where there is no target)."""
        dec_in = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id or 0, ignore_index)
        logits = self.forward(input_ids, attention_mask, dec_in)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                               ignore_index=ignore_index)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int = 0, ignore_index: int = -100) -> torch.Tensor:
    """Teacher forcing input: [start, y_1 .. y_{T-1}] (ignored label slots become padding)."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start_id
    return out.masked_fill(out == ignore_index, pad_id)


# -- assembly from presets ------------------------------------------------------------------------

def config_for_tokenizer(preset: str, tokenizer, *, n_layer: int = 0, n_embd: int = 0, n_head: int = 0,
                         max_len: int = 0, dropout: float | None = None) -> Seq2SeqConfig:
    """A preset sized to a tokenizer trained from scratch (``polymodal.tokenizers.seq2seq``): its
    vocabulary and special ids, optional layer/width/head overrides (0 = the preset's; head_dim
    follows n_embd / n_head when either changes), and a learned-position table long enough for
    ``max_len`` tokens (BART)."""
    base = Seq2SeqConfig.presets.get(preset)
    if base is None:
        raise ValueError(f"unknown seq2seq preset {preset!r}; choose from {', '.join(sorted(Seq2SeqConfig.presets))}")
    over: dict[str, Any] = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                                eos_token_id=tokenizer.eos_id, bos_token_id=None)
    # the first decoder input: T5 starts the target with <pad>, BART with </s> (Lewis et al. 2019)
    over["decoder_start_token_id"] = tokenizer.eos_id if base["variant"] == "bart" else tokenizer.pad_id
    if dropout is not None:
        over["dropout"] = dropout
    for k, v in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        if v < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0 (0 = the preset's), got {v}")
        if v:
            over[k] = v
    if n_embd or n_head:
        width, heads = n_embd or base["n_embd"], n_head or base["n_head"]
        if width % heads:
            raise ValueError(f"--n-embd {width} is not divisible by --n-head {heads}")
        over["head_dim"] = width // heads
    if base.get("block_size"):
        over["block_size"] = max(base["block_size"], max_len)
    return Seq2SeqConfig.from_preset(preset, **over)


# -- pre-training objectives ------------------------------------------------------------------------

def _segments(n_items: int, n_segments: int, generator: torch.Generator | None) -> list[int]:
    """A uniformly random split of n_items into n_segments non-empty runs (their lengths)."""
    cuts = sorted(torch.randperm(n_items - 1, generator=generator)[: n_segments - 1].tolist())
    bounds = [0] + [c + 1 for c in cuts] + [n_items]
    return [bounds[i + 1] - bounds[i] for i in range(n_segments)]


def span_corrupt(ids: Sequence[int], noise_density: float = 0.15, mean_span: float = 3.0,
                 sentinel_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                 eos_id: int | None = None) -> tuple[list[int], list[int]]:
    """T5 span corruption (Raffel et al. 2020, sec. 3.1.4; ``random_spans_noise_mask`` of the T5 code).

    round(n * noise_density) tokens are dropped in round(noise / mean_span) contiguous spans
    (span and kept-run lengths are uniformly random partitions; the text starts with a kept run).
    Returns (inputs, targets):

        inputs  = x..x S0 x..x S1 ... x..x S_{k-1}   (each dropped span -> its own sentinel)
        targets = S0 span_0 S1 span_1 ... S_{k-1} span_{k-1} S_k

    The final sentinel S_k ends the targets as ``<Z>`` does in the paper's example; ``eos_id``
    (if given) is appended to both. ``sentinel_ids`` are used in order (T5: <extra_id_0> =
    vocab-1, <extra_id_1> = vocab-2, ...); k + 1 of them are needed. :func:`span_restore`
    inverts the transformation.
    """
    ids = list(ids)
    n = len(ids)
    if n < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {n}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    n_noise = min(max(int(round(n * noise_density)), 1), n - 1)
    n_keep = n - n_noise
    n_spans = max(1, min(int(round(n_noise / mean_span)), n_noise, n_keep))
    if len(sentinel_ids) < n_spans + 1:
        raise ValueError(f"{n_spans} spans need {n_spans + 1} sentinel ids, got {len(sentinel_ids)}")
    noise_len = _segments(n_noise, n_spans, generator)
    keep_len = _segments(n_keep, n_spans, generator)
    inputs: list[int] = []
    targets: list[int] = []
    pos = 0
    for i in range(n_spans):
        inputs += ids[pos: pos + keep_len[i]] + [sentinel_ids[i]]
        pos += keep_len[i]
        targets += [sentinel_ids[i]] + ids[pos: pos + noise_len[i]]
        pos += noise_len[i]
    targets.append(sentinel_ids[n_spans])
    if eos_id is not None:
        inputs.append(eos_id)
        targets.append(eos_id)
    return inputs, targets


def span_restore(inputs: Sequence[int], targets: Sequence[int], sentinel_ids: Sequence[int],
                 eos_id: int | None = None) -> list[int]:
    """Puts the target spans back in place of their sentinels (the inverse of :func:`span_corrupt`)."""
    sent = {s: i for i, s in enumerate(sentinel_ids)}
    strip = lambda xs: list(xs[:-1]) if eos_id is not None and xs and xs[-1] == eos_id else list(xs)  # noqa: E731
    inputs, targets = strip(inputs), strip(targets)
    spans: dict[int, list[int]] = {}
    cur = None
    for t in targets:
        if t in sent:
            cur = sent[t]
            spans[cur] = []
        elif cur is None:
            raise ValueError("targets must start with a sentinel")
        else:
            spans[cur].append(t)
    out: list[int] = []
    for t in inputs:
        out += spans[sent[t]] if t in sent else [t]
    return out


class Infilled(NamedTuple):
    inputs: list[int]  # the corrupted text: each span replaced by ONE mask token
    targets: list[int]  # the original text (BART reconstructs all of it)
    spans: list[tuple[int, int]]  # (start, length) in the original; length 0 = an inserted mask


def text_infill(ids: Sequence[int], mask_id: int, mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                generator: torch.Generator | None = None) -> Infilled:
    """BART text infilling (Lewis et al. 2019, sec. 2.2; fairseq's ``mask=0.3`` default).

    Span lengths are drawn from Poisson(lambda = 3) until they cover round(n * mask_ratio)
    tokens (the last one trimmed); each span, including 0-length ones (which insert a mask
    where nothing was removed), is replaced by a single ``mask_id``, so the model must also
    predict how many tokens are missing. Spans go into distinct gaps between the kept
    tokens (uniformly at random), so two masks are never adjacent. The target is the original.
    """
    ids = list(ids)
    n = len(ids)
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    budget = int(round(n * mask_ratio))
    lengths: list[int] = []
    total = 0
    while total < budget:
        ln = int(torch.poisson(torch.tensor([poisson_lambda]), generator=generator).item())
        ln = min(ln, budget - total)
        lengths.append(ln)
        total += ln
    n_keep = n - total
    if len(lengths) > n_keep + 1:  # more spans than gaps between kept tokens: merge the surplus
        extra = sum(lengths[n_keep + 1:])
        lengths = lengths[: n_keep + 1]
        lengths[-1] += extra
    gaps = sorted(torch.randperm(n_keep + 1, generator=generator)[: len(lengths)].tolist())
    order = torch.randperm(len(lengths), generator=generator).tolist()  # spans in random order along the text
    inputs: list[int] = []
    spans: list[tuple[int, int]] = []
    src = kept = 0
    for g, j in zip(gaps, order):
        take = g - kept  # kept tokens before this span
        inputs += ids[src: src + take]
        src += take
        kept = g
        spans.append((src, lengths[j]))
        inputs.append(mask_id)
        src += lengths[j]
    inputs += ids[src:]
    return Infilled(inputs, ids, spans)
