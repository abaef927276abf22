"""The bidirectional encoder family: BERT, RoBERTa, ALBERT and MiniLM.

BERT (Devlin et al., 2019) is a stack of post-norm transformer blocks
(``nn.Block`` with ``prenorm=False``: x = LN(x + Attn(x)); x = LN(x + FFN(x)))
whose attention sees every real token of the sequence (no causal mask). The
input representation (sec. 3.2, fig. 2) is the sum of three embeddings,
normalised:

    E = LayerNorm(W_tok[x_t] + W_pos[p_t] + W_type[s_t])

and pre-training minimises the masked-LM cross-entropy (sec. 3.1, task 1) plus
next-sentence prediction on the pooled [CLS] vector tanh(W h_[CLS] + b)
(task 2). The variants only set flags:

| preset         | differences from BERT                                              | config.json |
|----------------|--------------------------------------------------------------------|-------------|
| bert-base/large| -                                                                  | bert-base-uncased, bert-large-uncased |
| roberta-base   | no NSP; positions counted from padding_idx + 1 (``position_from_padding``) | roberta-base (Liu et al., 2019) |
| albert-base-v2 | factorised embeddings E=128 -> H=768 (Lan et al., 2020, sec. 3.1 "factorized embedding parameterization": O(V*E + E*H) instead of O(V*H)); ONE block shared by all layers (sec. 3.1 "cross-layer parameter sharing"); sentence-order prediction (SOP) instead of NSP | albert-base-v2 |
| minilm-l6      | 6 layers, H=384 (a distilled BERT; Wang et al., 2020)               | sentence-transformers/all-MiniLM-L6-v2 |

Sentence embeddings (Sentence-BERT, Reimers & Gurevych, 2019, sec. 3) are the
mean of the token vectors over real tokens, u = sum_t m_t h_t / sum_t m_t,
L2-normalised so that the dot product is the cosine similarity.

Heads are separate modules on top of ``Encoder``: ``EncoderForMaskedLM`` (the
MLM transform + decoder tied to the word embeddings) and
``EncoderForPreTraining`` (MLM + NSP/SOP). ``EncoderConfig.task`` picks which
one a checkpoint builds (``build_encoder``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Block, LayerNorm, LearnedPositions, build_mask
from ..nn.mlp import activation
from .config import ConfigBase

TASKS = ("base", "mlm", "pretraining")
VARIANTS = ("bert", "roberta", "albert")


@dataclasses.dataclass
class EncoderConfig(ConfigBase):
    family: ClassVar[str] = "encoder"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    variant: str = "bert"  # bert | roberta | albert: the Hugging Face model_type it exports as
    task: str = "base"  # base (hidden states) | mlm | pretraining (MLM + NSP/SOP)
    vocab_size: int = 30522
    block_size: int = 512  # max_position_embeddings
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int | None = None  # default 4 * n_embd
    embedding_size: int | None = None  # ALBERT's factorised E (< n_embd); None = embed at n_embd, no projection
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    activation: str = "gelu"
    mlm_activation: str | None = None  # RoBERTa's lm_head hard-codes erf-GELU; None = ``activation``
    position_from_padding: bool = False  # RoBERTa: real tokens get positions pad_token_id+1, +2, ...
    share_layers: bool = False  # ALBERT: one block applied n_layer times
    pooler: bool | None = None  # tanh dense on [CLS]; None = all tasks but "mlm" (as *ForMaskedLM has none)
    n_pair_labels: int = 2  # NSP (IsNext/NotNext) or SOP (in order/swapped)
    dropout: float = 0.1
    init_std: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"EncoderConfig.task must be one of {TASKS}, got {self.task!r}")
        if self.pooler is None:
            self.pooler = self.task != "mlm"
        if self.variant not in VARIANTS:
            raise ValueError(f"EncoderConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.position_from_padding and self.pad_token_id is None:
            raise ValueError("position_from_padding needs pad_token_id (positions start at pad_token_id + 1)")
        if self.task == "pretraining" and not self.pooler:
            raise ValueError("task='pretraining' needs the pooler (NSP/SOP classify the pooled [CLS])")

    @property
    def hidden(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def emb(self) -> int:
        return self.embedding_size or self.n_embd

    @property
    def max_tokens(self) -> int:
        """Longest input: RoBERTa spends pad_token_id + 1 rows of the table before position 0."""
        return self.block_size - (self.pad_token_id + 1 if self.position_from_padding else 0)


def _register(name: str, **kw):
    EncoderConfig.presets[name] = kw


# bert-base-uncased / bert-large-uncased config.json
_bert = dict(variant="bert", vocab_size=30522, block_size=512, type_vocab_size=2, norm_eps=1e-12,
             activation="gelu", pad_token_id=0)
_register("bert-base", n_layer=12, n_head=12, n_embd=768, intermediate_size=3072, **_bert)
_register("bert-large", n_layer=24, n_head=16, n_embd=1024, intermediate_size=4096, **_bert)
# roberta-base config.json: 514 positions = 512 + padding_idx(1) + 1, one token type, eps 1e-5
_register("roberta-base", variant="roberta", vocab_size=50265, block_size=514, n_layer=12, n_head=12, n_embd=768,
          intermediate_size=3072, type_vocab_size=1, norm_eps=1e-5, activation="gelu", mlm_activation="gelu",
          position_from_padding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2)
# albert-base-v2 config.json (hidden_act gelu_new = tanh GELU; no dropout in v2)
_register("albert-base-v2", variant="albert", vocab_size=30000, block_size=512, n_layer=12, n_head=12, n_embd=768,
          intermediate_size=3072, embedding_size=128, type_vocab_size=2, norm_eps=1e-12, activation="gelu_tanh",
          share_layers=True, dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3)
# sentence-transformers/all-MiniLM-L6-v2 config.json (a BertModel)
_register("minilm-l6", n_layer=6, n_head=12, n_embd=384, intermediate_size=1536, **_bert)
# CPU-sized presets for tests.
_tiny = dict(vocab_size=128, block_size=64, n_layer=2, n_head=4, n_embd=32, intermediate_size=64, dropout=0.0)
_register("tiny-bert", **{**_bert, **_tiny})
_register("tiny-roberta", **{**_tiny, "variant": "roberta", "type_vocab_size": 1, "norm_eps": 1e-5,
                             "position_from_padding": True, "pad_token_id": 1, "block_size": 66})
_register("tiny-albert", **{**_tiny, "variant": "albert", "embedding_size": 16, "share_layers": True,
                            "n_layer": 3, "activation": "gelu_tanh"})


class Embeddings(nn.Module):
    """LayerNorm(word + position + token type) -> dropout [-> ALBERT's E -> H projection]."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.config = c
        self.word = nn.Embedding(c.vocab_size, c.emb)
        self.position = LearnedPositions(c.block_size, c.emb)
        self.token_type = nn.Embedding(c.type_vocab_size, c.emb) if c.type_vocab_size > 0 else None
        self.norm = LayerNorm(c.emb, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        # ALBERT's embedding_hidden_mapping_in: the factorisation V*E + E*H of the V*H table.
        self.proj = nn.Linear(c.emb, c.n_embd) if c.embedding_size is not None else None

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.position_from_padding:
            # Hugging Face ``create_position_ids_from_input_ids``: real tokens count up from
            # padding_idx + 1, padding tokens sit at padding_idx (fairseq's convention).
            real = input_ids.ne(c.pad_token_id).int()
            return (torch.cumsum(real, dim=1).type_as(real) * real).long() + c.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        c = self.config
        t = input_ids.shape[1]
        if t > c.max_tokens:
            raise ValueError(f"sequence of {t} tokens is longer than the model's {c.max_tokens} positions")
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        x = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            # Absent token types are segment A (id 0), as in BERT's single-sentence inputs.
            x = x + (self.token_type(token_type_ids) if token_type_ids is not None else self.token_type.weight[0])
        x = self.drop(self.norm(x))
        return self.proj(x) if self.proj is not None else x


class Pooler(nn.Module):
    """BERT's pooled output: tanh(W h_[CLS] + b), the input of NSP/SOP and classifiers."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class Encoder(nn.Module):
    """Embeddings + a stack of post-norm bidirectional blocks (+ pooler)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        c = self.config = config
        self.embeddings = Embeddings(c)
        n_blocks = 1 if c.share_layers else c.n_layer
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.hidden, norm="layernorm", norm_eps=c.norm_eps, act=c.activation,
                  prenorm=False, dropout=c.dropout, layer_idx=i)
            for i in range(n_blocks)
        )
        self.pooler = Pooler(c.n_embd) if c.pooler else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # BERT's initialiser: N(0, 0.02) weights, zero biases, unit LayerNorm gains.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, LearnedPositions):
                nn.init.normal_(m.weight, std=self.config.init_std)

    def layer(self, i: int) -> Block:
        """The block run at depth i (ALBERT: the same one every time)."""
        return self.blocks[0 if self.config.share_layers else i]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, n_embd). attention_mask (B, T): 1 real token, 0 padding."""
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # Only padded batches get a mask: with None, SDPA runs its unmasked fast kernel.
            slots = torch.arange(x.shape[1], device=x.device)
            mask = build_mask("bidirectional", slots, slots, key_valid=attention_mask.to(torch.bool))
        for i in range(self.config.n_layer):
            x = self.layer(i)(x, mask)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.pooler is None:
            raise ValueError(f"{self.config.name}: this encoder has no pooler (config.pooler=False)")
        return self.pooler(hidden)


class MaskedLMHead(nn.Module):
    """BERT's MLM head: LN(act(W h)) projected onto the (tied) word embeddings, plus a bias.

    For ALBERT the transform maps H -> E so the decoder reuses the E-wide table."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.n_embd, c.emb)
        self.act = activation(c.mlm_activation or c.activation)
        self.norm = LayerNorm(c.emb, eps=c.norm_eps)
        self.decoder = nn.Linear(c.emb, c.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class EncoderForMaskedLM(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.mlm = MaskedLMHead(config)
        for m in self.mlm.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=config.init_std)
                nn.init.zeros_(m.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """The MLM decoder is the transposed input embedding (Press & Wolf, 2017), as in BERT."""
        self.mlm.decoder.weight = self.encoder.embeddings.word.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> torch.Tensor:
        """MLM logits (B, T, vocab)."""
        return self.mlm(self.encoder(input_ids, attention_mask, token_type_ids, position_ids))


class EncoderForPreTraining(EncoderForMaskedLM):
    """MLM + a 2-way classifier of the pooled [CLS]: NSP for BERT, SOP for ALBERT."""

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.pair_head = nn.Linear(config.n_embd, config.n_pair_labels)
        nn.init.normal_(self.pair_head.weight, std=config.init_std)
        nn.init.zeros_(self.pair_head.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """(MLM logits (B, T, vocab), NSP/SOP logits (B, n_pair_labels))."""
        h = self.encoder(input_ids, attention_mask, token_type_ids, position_ids)
        return self.mlm(h), self.pair_head(self.encoder.pool(h))


MODELS = {"base": Encoder, "mlm": EncoderForMaskedLM, "pretraining": EncoderForPreTraining}


def build_encoder(config: EncoderConfig) -> nn.Module:
    """The registry's constructor: the model class follows ``config.task``."""
    return MODELS[config.task](config)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy over the masked positions only (labels = -100 elsewhere)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=ignore_index)


# -- sentence embeddings -------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the real tokens' vectors: sum_t m_t h_t / sum_t m_t (SBERT's MEAN strategy)."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise rows, so dot products are cosine similarities."""
    return F.normalize(x, p=2, dim=-1, eps=eps)


class SentenceEncoder:
    """Texts -> sentence embeddings with an ``Encoder`` and its tokenizer.

    Batches are formed after sorting by token length, so each batch pads only to
    its own longest sentence (little padding, and a batch of equal lengths runs
    SDPA's unmasked kernel); results are returned in the input order.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256, pooling: str = "mean",
                 normalize: bool = True, pad_id: int | None = None):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model = model.encoder if hasattr(model, "encoder") and isinstance(model.encoder, Encoder) else model
        config = self.model.config
        self.max_length = min(max_length, config.max_tokens)
        self.pooling = pooling
        self.normalize = normalize
        self.pad_id = pad_id if pad_id is not None else (config.pad_token_id or 0)
        backend = getattr(tokenizer, "backend", tokenizer)  # polymodal Tokenizer or a tokenizers.Tokenizer
        if not hasattr(backend, "encode_batch") or not hasattr(backend, "to_str"):
            raise TypeError(f"expected a polymodal Tokenizer or tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        # A private copy: tokenizer.json files of sentence-transformers models often pad every
        # input to a fixed length (128), which would waste most of the compute; we pad per batch.
        self._tok = type(backend).from_str(backend.to_str())
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_length)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]

    def _batch(self, ids: list[list[int]], device, dtype) -> torch.Tensor:
        """Pooled embeddings of one length-sorted batch (runs in a worker thread: grad and
        autocast modes are thread-local, so they are entered here)."""
        longest = max(len(x) for x in ids)
        batch = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), longest, dtype=torch.long)
        for r, x in enumerate(ids):
            batch[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        batch, mask = batch.to(device), mask.to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                                                    enabled=dtype not in (None, torch.float32)):
            h = self.model(batch, mask).float()
            e = mean_pool(h, mask) if self.pooling == "mean" else h[:, 0]
            return (normalize(e) if self.normalize else e).cpu()

    def encode(self, texts: Sequence[str] | str, batch_size: int = 64, dtype: torch.dtype | None = None,
               workers: int | None = None) -> torch.Tensor:
        """Embeddings (N, n_embd) in fp32, in the order of ``texts``; at most ``batch_size``
        sentences per forward pass.

        ``dtype`` (e.g. torch.bfloat16) runs the encoder under autocast; pooling and
        normalisation stay in fp32.

        On CPU, ``workers`` batches (default: ``torch.get_num_threads()``) run at once, each
        with one intra-op thread, instead of one batch at a time on all threads. A sentence
        batch is many small GEMMs and element-wise ops; splitting each of them across threads
        costs a barrier per op, while whole batches per thread need no synchronisation.
        Results are bit-identical to the one-batch-at-a-time path. The process-wide thread
        count is set to 1 for the duration of the call and restored afterwards.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        device = next(self.model.parameters()).device
        threads = torch.get_num_threads()
        workers = max(1, workers or threads) if device.type == "cpu" else 1
        # Fewer sentences than workers * batch_size: smaller batches, so no worker idles.
        size = max(1, min(batch_size, -(-len(order) // workers)))
        chunks = [order[s:s + size] for s in range(0, len(order), size)]
        workers = min(workers, len(chunks))
        jobs = [[ids[i] for i in idx] for idx in chunks]
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(workers) as pool:
                    results = list(pool.map(lambda j: self._batch(j, device, dtype), jobs))
            finally:
                torch.set_num_threads(threads)
        else:
            results = [self._batch(j, device, dtype) for j in jobs]
        out = torch.empty(len(ids), self.model.config.n_embd)
        for idx, e in zip(chunks, results):
            out[torch.tensor(idx)] = e
        return out[0] if single else out
