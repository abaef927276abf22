"""Fusion encoders for VQA and image-text matching.

VisualBERT (Li et al., 2019, "VisualBERT: A Simple and Performant Baseline for Vision and
Language", sec. 3.1): ONE bidirectional transformer over the concatenation of text tokens
and visual tokens. Each visual token is a projected image feature plus a segment
embedding (e_s = 1 for vision, 0 for text) and a position embedding:

    e_text_i = W_tok[x_i] + P[i] + S[0],    f_j = W_v v_j + P_v[j] + S[1]
    H = Encoder([e_text; f])   (post-norm BERT blocks, bidirectional, padding masked)

ViLBERT (Lu et al., 2019, "ViLBERT: Pretraining Task-Agnostic Visiolinguistic
Representations", sec. 3.1, fig. 2): TWO streams, text and vision, each with its own
transformer layers, joined by co-attentional layers in which each stream's queries attend
to the other stream's keys and values:

    H_t' = CoTRM_t(H_t, H_v),   H_v' = CoTRM_v(H_v, H_t)     (both from the previous layer's outputs)

A co-layer here is ``nn.Block(cross=True)``: self-attention, then cross-attention to the
other stream, then the FFN (the paper's co-attention -> FFN followed by a self-attention
TRM, with the two sub-blocks in one residual stack). The visual stream starts with an IMG
token: the mean of the projected region features (the paper's "mean-pooled" image token).

Visual input: the papers use Faster R-CNN region features; any (B, N, D_v) features work
here, e.g. ``image_patches`` (raw pixel patches, for small synthetic sets like easy-VQA) or a
ViT's patch hidden states. With ``image_size > 0`` in the config the model also owns its pixel
front end (``image_features``): flattened P x P patches (``image_stem="patches"``, D_v = 3P^2)
or a small ResNet stem of log2(P) stride-2 stages (``image_stem="conv"``, D_v = its last width),
so a checkpoint trained from pixels carries its preprocessing and its answer list (``answers``).

Heads (both models):
* VQA as classification over an answer vocabulary (Antol et al., 2015; Teney et al., 2018):
  a 2-layer MLP (Linear, GELU, LayerNorm, Linear) on the pooled output; trained with
  ``vqa_loss`` (cross-entropy on a class index, or binary cross-entropy on soft scores
  min(#humans/3, 1) as in bottom-up-top-down VQA);
* image-text matching: a linear 2-way classifier (0 = mismatch, 1 = match) on the pooled output.
Pooled output: VisualBERT: tanh(W h_[CLS]) (BERT's pooler). ViLBERT: the element-wise
product h_CLS * h_IMG of the two streams' pooled outputs (paper sec. 3.2, VQA / alignment).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from ..nn.init import normal_init_

from ..nn import Block, build_mask, make_norm
from .config import ConfigBase


def image_patches(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*P*P) flattened non-overlapping patches (row-major grid)."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image of {h}x{w} pixels is not a multiple of the {p}x{p} patch size")
    x = pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def _key_valid(mask: torch.Tensor | None, b: int, n: int, device) -> torch.Tensor:
    return torch.ones(b, n, dtype=torch.bool, device=device) if mask is None else mask.to(torch.bool)


def _pad_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, S) key validity -> the bidirectional boolean mask (B, 1, 1, S) of ``nn.build_mask``."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    return build_mask("bidirectional", slots, slots, valid)


class AnswerHead(nn.Sequential):
    """Linear(D, 2D) -> GELU -> LayerNorm -> Linear(2D, A): the VQA classifier of LXMERT/ViLBERT."""

    def __init__(self, dim: int, num_answers: int, eps: float = 1e-12):
        super().__init__(nn.Linear(dim, 2 * dim), nn.GELU(), nn.LayerNorm(2 * dim, eps=eps),
                         nn.Linear(2 * dim, num_answers))


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """targets (B,) int answer ids -> cross-entropy; (B, A) float soft scores -> binary
    cross-entropy summed over answers (Teney et al., 2018). ``reduction``: the mean over
    questions, their sum (to normalise by a count of one's own, e.g. a global batch's), or none."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if targets.dtype in (torch.int64, torch.int32):
        per = F.cross_entropy(logits.float(), targets.long(), reduction="none")
    else:
        if targets.shape != logits.shape:
            raise ValueError(f"soft VQA targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
        per = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").sum(-1)
    return per if reduction == "none" else per.sum() if reduction == "sum" else per.mean()


@dataclasses.dataclass
class _PixelInputConfig(ConfigBase):
    """Fields both fusion configs share: the optional pixel front end, its preprocessing
    (read by ``polymodal.data.images.ImageProcessor.from_config``) and the answer names."""

    answers: tuple[str, ...] = ()  # VQA class index -> normalised answer string
    image_size: int = 0  # > 0: square pixel input the model embeds itself (image_features)
    image_stem: str = "patches"  # patches (flattened P x P pixels) | conv (stride-P ResNet stem)
    patch_size: int = 4  # P: pixels per visual token side
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resize_mode: str = "square"  # keep the whole scene: a question may be about any corner
    resample: str = "bicubic"


def conv_stem_widths(visual_dim: int, patch_size: int) -> tuple[int, ...]:
    """log2(P) stage widths ending at ``visual_dim``, halving backwards (never below 8)."""
    n = int(math.log2(patch_size))
    if patch_size < 2 or 2 ** n != patch_size:
        raise ValueError(f"a conv stem needs a power-of-two patch_size >= 2, got {patch_size}")
    return tuple(max(8, visual_dim >> (n - 1 - i)) for i in range(n))


class _FusionBase(nn.Module):
    def _build_stem(self) -> None:
        """The pixel front end of ``image_size > 0`` configs (None otherwise)."""
        c = self.config
        self.stem = None
        if c.image_size <= 0:
            return
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size={c.image_size} is not a multiple of patch_size={c.patch_size}")
        n = (c.image_size // c.patch_size) ** 2
        if n > c.max_visual:
            raise ValueError(f"{n} visual tokens ({c.image_size}/{c.patch_size} squared) exceed max_visual={c.max_visual}")
        if c.image_stem == "patches":
            if c.visual_dim != 3 * c.patch_size ** 2:
                raise ValueError(f"image_stem='patches' gives 3*{c.patch_size}^2 = {3 * c.patch_size ** 2} features; "
                                 f"set visual_dim to that (got {c.visual_dim})")
        elif c.image_stem == "conv":
            from .contrastive import _Stage

            widths = conv_stem_widths(c.visual_dim, c.patch_size)
            if widths[-1] != c.visual_dim or any(w % 8 for w in widths):
                raise ValueError(f"conv stem widths {widths} must be multiples of 8 ending at visual_dim={c.visual_dim}")
            chans = (3,) + widths
            self.stem = nn.Sequential(*(_Stage(a, b, 8) for a, b in zip(chans[:-1], chans[1:])))
        else:
            raise ValueError(f"image_stem must be 'patches' or 'conv', got {c.image_stem!r}")

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> visual tokens (B, (S/P)^2, visual_dim), row-major grid."""
        c = self.config
        if c.image_size <= 0:
            raise ValueError("this model has no pixel front end (image_size=0): pass visual features instead")
        if self.stem is None:
            return image_patches(pixel_values, c.patch_size)
        x = self.stem(pixel_values.to(next(self.stem.parameters()).dtype))
        return x.flatten(2).transpose(1, 2)

    def _check_inputs(self, input_ids: torch.Tensor, visual_feats: torch.Tensor) -> tuple[int, int, int]:
        """(batch, text length, visual tokens), after checking them against the config."""
        c = self.config
        b, t = input_ids.shape
        n = visual_feats.shape[1]
        if t > c.max_text_len:
            raise ValueError(f"text of {t} tokens is longer than max_text_len={c.max_text_len}")
        if n > c.max_visual:
            raise ValueError(f"{n} visual tokens exceed max_visual={c.max_visual}")
        if visual_feats.shape[-1] != c.visual_dim:
            raise ValueError(f"visual features have {visual_feats.shape[-1]} dims, the model expects {c.visual_dim}")
        return b, t, n

    def reset_parameters(self) -> None:
        normal_init_(self, self.config.init_std)
        if getattr(self, "stem", None) is not None:  # convolutions keep He init (a 0.02 std would vanish)
            for m in self.stem.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def vqa_logits(self, *args, **kw) -> torch.Tensor:
        return self.vqa_head(self.pooled(*args, **kw))

    def itm_logits(self, *args, **kw) -> torch.Tensor:
        return self.itm_head(self.pooled(*args, **kw))

    def forward(self, input_ids: torch.Tensor, visual_feats: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_index: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """{"vqa": (B, num_answers), "itm": (B, 2), "pooled": (B, D)} from one encoder pass.

        Visual input: ``visual_feats`` (B, N, visual_dim), or ``pixel_values`` (M, 3, S, S) of M
        distinct images embedded by the model's own front end, with ``image_index`` (B,) naming
        each question's image: questions about one image share one stem pass."""
        if visual_feats is None:
            if pixel_values is None:
                raise ValueError("give visual_feats or pixel_values")
            visual_feats = self.image_features(pixel_values)
            if image_index is not None:
                visual_feats = visual_feats[image_index]
        pooled = self.pooled(input_ids, visual_feats, attention_mask, visual_mask)
        out = {"pooled": pooled, "itm": self.itm_head(pooled)}
        if self.vqa_head is not None:
            out["vqa"] = self.vqa_head(pooled)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- VisualBERT ---------------------------------------------------------------------------
@dataclasses.dataclass
class VisualBERTConfig(_PixelInputConfig):
    family: ClassVar[str] = "visualbert"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    vocab_size: int = 30522
    max_text_len: int = 128
    max_visual: int = 64  # visual position table (regions / patches per image)
    visual_dim: int = 2048  # input feature size (Faster R-CNN: 2048)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    intermediate_size: int | None = None
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.1
    num_answers: int = 0  # > 0 adds the VQA answer classifier
    init_std: float = 0.02


VisualBERTConfig.presets["visualbert-base"] = {}  # uclanlp/visualbert-vqa-coco-pre shapes
VisualBERTConfig.presets["visualbert-nano"] = dict(vocab_size=128, max_text_len=32, max_visual=16, visual_dim=48,
                                                    n_embd=64, n_layer=2, n_head=4, intermediate_size=128,
                                                    dropout=0.0, num_answers=8)


class VisualBERT(_FusionBase):
    def __init__(self, config: VisualBERTConfig):
        super().__init__()
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.max_text_len, c.n_embd)
        self.segment = nn.Embedding(2, c.n_embd)  # 0 = text, 1 = vision
        self.visual_proj = nn.Linear(c.visual_dim, c.n_embd)
        self.visual_pos = nn.Embedding(c.max_visual, c.n_embd)
        self.ln_emb = make_norm("layernorm", c.n_embd, c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.intermediate_size or 4 * c.n_embd, norm_eps=c.norm_eps, act=c.activation,
                  prenorm=False, dropout=c.dropout, layer_idx=i) for i in range(c.n_layer))
        self.pooler = nn.Linear(c.n_embd, c.n_embd)
        self.vqa_head = AnswerHead(c.n_embd, c.num_answers, c.norm_eps) if c.num_answers > 0 else None
        self.itm_head = nn.Linear(c.n_embd, 2)
        self._build_stem()
        self.reset_parameters()

    def hidden_states(self, input_ids: torch.Tensor, visual_feats: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T + N, D): text positions first ([CLS] at 0), then the visual tokens."""
        c = self.config
        b, t, n = self._check_inputs(input_ids, visual_feats)
        dev = input_ids.device
        text = self.wte(input_ids) + self.wpe(torch.arange(t, device=dev)) + self.segment.weight[0]
        vis = self.visual_proj(visual_feats.to(text.dtype)) + self.visual_pos(torch.arange(n, device=dev)) \
            + self.segment.weight[1]
        x = self.drop(self.ln_emb(torch.cat([text, vis], 1)))
        valid = torch.cat([_key_valid(attention_mask, b, t, dev), _key_valid(visual_mask, b, n, dev)], 1)
        mask = None if bool(valid.all()) else _pad_mask(valid)
        for blk in self.blocks:
            x = blk(x, mask)
        return x

    def pooled(self, input_ids, visual_feats, attention_mask=None, visual_mask=None) -> torch.Tensor:
        h = self.hidden_states(input_ids, visual_feats, attention_mask, visual_mask)
        return torch.tanh(self.pooler(h[:, 0]))


# -- ViLBERT ------------------------------------------------------------------------------
@dataclasses.dataclass
class ViLBERTConfig(_PixelInputConfig):
    family: ClassVar[str] = "vilbert"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    vocab_size: int = 30522
    max_text_len: int = 128
    max_visual: int = 64
    visual_dim: int = 2048
    n_embd: int = 768  # text stream
    n_layer: int = 12  # text-only layers before the co-attention stack (the paper: BERT-base's 12)
    n_head: int = 12
    intermediate_size: int | None = None
    v_embd: int = 1024  # visual stream (the paper: 1024 wide, 8 heads)
    v_layer: int = 0  # vision-only layers before the co-attention stack
    v_head: int = 8
    v_intermediate_size: int | None = None
    n_co_layer: int = 6
    bi_dim: int = 1024  # the pooled outputs of both streams meet here
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.1
    num_answers: int = 0
    init_std: float = 0.02


ViLBERTConfig.presets["vilbert-base"] = dict(n_layer=6)  # 6 text + 6 co-layers (the released model's split)
ViLBERTConfig.presets["vilbert-nano"] = dict(vocab_size=128, max_text_len=32, max_visual=16, visual_dim=48, n_embd=64,
                                             n_layer=1, n_head=4, intermediate_size=128, v_embd=48, v_layer=1,
                                             v_head=4, v_intermediate_size=96, n_co_layer=1, bi_dim=64,
                                             dropout=0.0, num_answers=8)


class ViLBERT(_FusionBase):
    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        c = self.config = config
        th, vh = c.intermediate_size or 4 * c.n_embd, c.v_intermediate_size or 4 * c.v_embd
        blk = dict(norm_eps=c.norm_eps, act=c.activation, prenorm=False, dropout=c.dropout)
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.max_text_len, c.n_embd)
        self.ln_text = make_norm("layernorm", c.n_embd, c.norm_eps)
        self.visual_proj = nn.Linear(c.visual_dim, c.v_embd)
        self.visual_pos = nn.Embedding(c.max_visual + 1, c.v_embd)  # slot 0: the IMG token
        self.ln_vis = make_norm("layernorm", c.v_embd, c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.text_blocks = nn.ModuleList(Block(c.n_embd, c.n_head, th, layer_idx=i, **blk) for i in range(c.n_layer))
        self.vis_blocks = nn.ModuleList(Block(c.v_embd, c.v_head, vh, layer_idx=i, **blk) for i in range(c.v_layer))
        # co-attention: text queries over visual keys/values, and visual queries over text
        self.co_text = nn.ModuleList(Block(c.n_embd, c.n_head, th, cross=True, cross_kv_dim=c.v_embd, **blk)
                                     for _ in range(c.n_co_layer))
        self.co_vis = nn.ModuleList(Block(c.v_embd, c.v_head, vh, cross=True, cross_kv_dim=c.n_embd, **blk)
                                    for _ in range(c.n_co_layer))
        self.text_pool = nn.Linear(c.n_embd, c.bi_dim)
        self.vis_pool = nn.Linear(c.v_embd, c.bi_dim)
        self.vqa_head = AnswerHead(c.bi_dim, c.num_answers, c.norm_eps) if c.num_answers > 0 else None
        self.itm_head = nn.Linear(c.bi_dim, 2)
        self._build_stem()
        self.reset_parameters()

    def streams(self, input_ids: torch.Tensor, visual_feats: torch.Tensor, attention_mask: torch.Tensor | None = None,
                visual_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states of the text stream (B, T, D_t) and the visual stream (B, 1 + N, D_v)."""
        c = self.config
        b, t, n = self._check_inputs(input_ids, visual_feats)
        dev = input_ids.device
        tv = _key_valid(attention_mask, b, t, dev)
        vv = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), _key_valid(visual_mask, b, n, dev)], 1)
        text = self.drop(self.ln_text(self.wte(input_ids) + self.wpe(torch.arange(t, device=dev))))
        v = self.visual_proj(visual_feats.to(text.dtype))
        w = vv[:, 1:, None].to(v.dtype)
        img = (v * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)  # IMG token: mean of the regions
        vis = self.drop(self.ln_vis(torch.cat([img, v], 1) + self.visual_pos(torch.arange(n + 1, device=dev))))
        t_mask = None if bool(tv.all()) else _pad_mask(tv)
        v_mask = None if bool(vv.all()) else _pad_mask(vv)
        for blk in self.text_blocks:
            text = blk(text, t_mask)
        for blk in self.vis_blocks:
            vis = blk(vis, v_mask)
        for bt, bv in zip(self.co_text, self.co_vis):
            # both updates read the previous layer's streams (the paper's parallel co-TRMs)
            text, vis = (bt(text, t_mask, memory=vis, memory_mask=v_mask),
                         bv(vis, v_mask, memory=text, memory_mask=t_mask))
        return text, vis

    def pooled(self, input_ids, visual_feats, attention_mask=None, visual_mask=None) -> torch.Tensor:
        text, vis = self.streams(input_ids, visual_feats, attention_mask, visual_mask)
        h_cls = F.relu(self.text_pool(text[:, 0]))  # ViLBERT's BertTextPooler / BertImagePooler: dense + ReLU
        h_img = F.relu(self.vis_pool(vis[:, 0]))
        return h_cls * h_img


def fusion_config(arch: str, answers, vocab_size: int, max_text_len: int, image_size: int = 64,
                  patch_size: int = 16, image_stem: str = "conv", stem_width: int = 128, width: int = 128,
                  layers: int = 3, single_layers: int = 1, heads: int = 4, ffn_mult: int = 2,
                  dropout: float = 0.0) -> "VisualBERTConfig | ViLBERTConfig":
    """The config of a VisualBERT (``layers`` joint blocks) or ViLBERT (``single_layers`` text-only
    and vision-only blocks, then ``layers`` co-attention blocks) that embeds its own pixels and
    names its answers: ``(image_size / patch_size)^2`` visual tokens of ``stem_width`` features
    (conv stem) or of 3 P^2 raw pixels (patches)."""
    n_visual = (image_size // patch_size) ** 2
    visual_dim = stem_width if image_stem == "conv" else 3 * patch_size ** 2
    common = dict(answers=tuple(answers), num_answers=len(answers), image_size=image_size, image_stem=image_stem,
                  patch_size=patch_size, vocab_size=vocab_size, max_text_len=max_text_len, max_visual=n_visual,
                  visual_dim=visual_dim, n_embd=width, n_head=heads, intermediate_size=ffn_mult * width,
                  dropout=dropout)
    if arch == "visualbert":
        return VisualBERTConfig(name="visualbert-vqa", n_layer=layers, **common)
    if arch == "vilbert":
        return ViLBERTConfig(name="vilbert-vqa", n_layer=single_layers, v_embd=width, v_layer=single_layers,
                             v_head=heads, v_intermediate_size=ffn_mult * width, n_co_layer=layers, bi_dim=width,
                             **common)
    raise ValueError(f"arch must be 'visualbert' or 'vilbert', got {arch!r}")


def build_fusion(arch: str, *args, **kw) -> nn.Module:
    """The model of :func:`fusion_config` (same arguments)."""
    cfg = fusion_config(arch, *args, **kw)
    return (VisualBERT if arch == "visualbert" else ViLBERT)(cfg)
