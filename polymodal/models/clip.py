"""CLIP and ALIGN-style dual encoders (Radford et al., 2021, "Learning Transferable
Visual Models From Natural Language Supervision", fig. 3; Jia et al., 2021, ALIGN).

An image tower f and a text tower g each pool their input to one vector; linear
projections (no bias) map both into a shared space where the similarity is the
scaled cosine

    logits_per_image[i, j] = exp(t) * <W_i f(x_i) / |W_i f(x_i)|, W_t g(y_j) / |W_t g(y_j)|>

with the temperature learned as t = log(1 / tau) (stored as a log so it stays
positive; CLIP initialises tau = 0.07, t = 2.6592). The contrastive objective is the
symmetric cross-entropy over the rows and the columns of that matrix (fig. 3's
pseudo-code), ``contrastive_loss``.

The towers are interchangeable. Any module with

    encode(inputs...) -> (B, D) pooled features   and   output_dim -> D

can be the image or the text side; the sub-configs carry their own ``family`` so a
saved ``config.json`` rebuilds whatever towers were used. The defaults reproduce
OpenAI CLIP:

* image tower: ``ViT`` with CLIP's extra LayerNorm on the embeddings (``pre_norm``),
  no patch bias, quick-GELU, class-token pooling with the final LayerNorm on that
  token only;
* text tower: ``CLIPText``, a causal pre-norm transformer (the GPT-2 stack of
  ``nn.Block``) with learned positions and quick-GELU, read out at the end-of-text
  token. Hugging Face keeps a legacy rule that we replicate exactly: when the
  config's ``eos_token_id`` is 2 (old OpenAI configs) the EOS position is the argmax
  of the token ids (EOT is the largest id in CLIP's vocabulary), otherwise it is the
  first position holding ``eos_token_id``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from ..nn.init import normal_init_

from ..nn import Block, LearnedPositions, build_mask, make_norm
from .config import ConfigBase
from .vit import ViT, ViTConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------
# text tower
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class CLIPTextConfig(ConfigBase):
    family: ClassVar[str] = "clip_text"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    vocab_size: int = 49408
    block_size: int = 77  # max_position_embeddings; also the tokenizer's max length
    n_embd: int = 512
    n_layer: int = 12
    n_head: int = 8
    intermediate_size: int | None = None  # default 4 * n_embd
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5
    qkv_bias: bool = True
    causal: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    pad_token_id: int | None = 1

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def hidden(self) -> int:
        return self.intermediate_size or 4 * self.n_embd


class CLIPText(nn.Module):
    """CLIP's text transformer: token + learned position embeddings, a causal pre-norm
    ``Block`` stack, a final LayerNorm, pooled at the end-of-text token."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        c = self.config = config
        self.tok_embed = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_embed = LearnedPositions(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.hidden, norm="layernorm", norm_eps=c.norm_eps, act=c.activation,
                  qkv_bias=c.qkv_bias, prenorm=True, dropout=c.dropout, layer_idx=i)
            for i in range(c.n_layer)
        )
        self.ln_f = make_norm("layernorm", c.n_embd, c.norm_eps)
        normal_init_(self, c.init_std, embeddings=False)
        nn.init.normal_(self.tok_embed.weight, std=c.init_std)
        nn.init.normal_(self.pos_embed.weight, std=0.01)  # CLIP's text position init

    @property
    def output_dim(self) -> int:
        return self.config.n_embd

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> final-normed hidden states (B, T, D).

        Positions are 0..T-1 whatever the padding (as in CLIP and HF); padded keys are
        masked. CLIP tokenizers pad on the right, where causality already hides the pads
        from every real token, so a fully real or right-padded batch takes SDPA's causal
        fast path with no mask tensor at all."""
        c = self.config
        b, t = input_ids.shape
        if t > c.block_size:
            raise ValueError(f"text of {t} tokens is longer than the text tower's context ({c.block_size} tokens)")
        pos = torch.arange(t, device=input_ids.device)
        x = self.drop(self.tok_embed(input_ids) + self.pos_embed(pos)[None])
        mask, is_causal = None, c.causal
        if c.causal and attention_mask is not None and not _right_padded(attention_mask):
            mask, is_causal = build_mask("causal", pos, pos, attention_mask.to(torch.bool)), False
        elif not c.causal and attention_mask is not None and not bool(attention_mask.all()):
            mask = build_mask("bidirectional", pos, pos, attention_mask.to(torch.bool))
        for blk in self.blocks:
            x = blk(x, mask, is_causal=is_causal)
        return self.ln_f(x)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the token each sequence is read out at (HF ``CLIPTextModel`` rule)."""
        eos = self.config.eos_token_id
        if eos is None or eos == 2:
            # Legacy OpenAI configs say eos_token_id=2; the EOT token is the highest id in the
            # vocabulary, so argmax over ids finds it (what HF keeps for those checkpoints).
            return input_ids.to(torch.int).argmax(dim=-1)
        # First occurrence (the pad token may equal EOS, so not the last one).
        return (input_ids == eos).to(torch.int).argmax(dim=-1)

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), self.eos_positions(input_ids)]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled text features (B, D): the tower interface."""
        return self.pool(self.hidden_states(input_ids, attention_mask), input_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hidden_states(input_ids, attention_mask)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed.weight", "tok_embed.weight"}  # learned positions and the token table


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is 1...1 0...0 (or all ones)."""
    am = attention_mask.to(torch.int)
    return bool((am[:, 1:] <= am[:, :-1]).all())


# ---------------------------------------------------------------------------------------
# dual encoder
# ---------------------------------------------------------------------------------------
TOWER_CONFIGS: dict[str, type[ConfigBase]] = {"vit": ViTConfig, "clip_text": CLIPTextConfig}
TOWERS: dict[str, type[nn.Module]] = {"vit": ViT, "clip_text": CLIPText}


def _tower_config(d: Any, default: str) -> ConfigBase:
    if isinstance(d, ConfigBase):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"a tower config must be a dict or a Config, got {type(d).__name__}")
    family = d.get("family", default)
    if family in TOWER_CONFIGS:
        return TOWER_CONFIGS[family].from_dict(d)
    from .registry import config_from_dict  # any registered family can be a tower

    return config_from_dict({**d, "family": family})


def build_tower(config: ConfigBase) -> nn.Module:
    if config.family in TOWERS:
        return TOWERS[config.family](config)
    from .registry import build_model

    tower = build_model(config)
    if not hasattr(tower, "encode") or not hasattr(tower, "output_dim"):
        raise ValueError(f"{type(tower).__name__} cannot be a dual-encoder tower: it needs encode() and output_dim")
    return tower


def _clip_vision(**kw) -> dict[str, Any]:
    base = dict(family="vit", image_size=224, patch_size=32, n_embd=768, n_layer=12, n_head=12, intermediate_size=3072,
                activation="quick_gelu", norm_eps=1e-5, qkv_bias=True, patch_bias=False, pre_norm=True,
                final_norm="pooled", pool="cls", image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                resample="bicubic", resize_mode="shortest", center_crop=True)
    return {**base, **kw}


def _clip_text(**kw) -> dict[str, Any]:
    base = dict(family="clip_text", vocab_size=49408, block_size=77, n_embd=512, n_layer=12, n_head=8,
                intermediate_size=2048, activation="quick_gelu", norm_eps=1e-5)
    return {**base, **kw}


@dataclasses.dataclass
class CLIPConfig(ConfigBase):
    family: ClassVar[str] = "clip"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    vision: Any = dataclasses.field(default_factory=lambda: _clip_vision())
    text: Any = dataclasses.field(default_factory=lambda: _clip_text())
    projection_dim: int = 512
    logit_scale_init: float = 2.6592  # log(1 / 0.07)
    logit_scale_max: float = 4.6052  # log(100): CLIP clips the temperature during training
    logit_bias_init: float | None = None  # set (SigLIP: -10) to learn the sigmoid loss's bias b
    # the towers' BatchNorm layers keep their running statistics in training (a pretrained tower:
    # ALIGN's EfficientNet); a frozen tower always runs in eval mode whatever this says
    frozen_bn: bool = False

    def __post_init__(self):
        self.vision = _tower_config(self.vision, "vit")
        self.text = _tower_config(self.text, "clip_text")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vision"], d["text"] = self.vision.to_dict(), self.text.to_dict()
        d["family"] = self.family
        return d


def _register(name: str, **kw):
    CLIPConfig.presets[name] = kw


# openai/clip-vit-base-patch32 and -patch16 config.json. Their text_config says eos_token_id=2
# (the legacy value): pooling then uses the argmax of the ids, as HF does for those checkpoints.
_register("clip-vit-base-patch32", vision=_clip_vision(patch_size=32),
          text=_clip_text(bos_token_id=0, eos_token_id=2, pad_token_id=1), projection_dim=512)
_register("clip-vit-base-patch16", vision=_clip_vision(patch_size=16),
          text=_clip_text(bos_token_id=0, eos_token_id=2, pad_token_id=1), projection_dim=512)
# openai/clip-vit-large-patch14
_register("clip-vit-large-patch14", vision=_clip_vision(patch_size=14, n_embd=1024, n_layer=24, n_head=16,
                                                        intermediate_size=4096),
          text=_clip_text(n_embd=768, n_head=12, intermediate_size=3072, bos_token_id=0, eos_token_id=2),
          projection_dim=768)
# CPU-sized: 32x32 images (e.g. CIFAR captions), a small text model.
_register("clip-nano", vision=_clip_vision(image_size=32, patch_size=8, n_embd=64, n_layer=2, n_head=4,
                                           intermediate_size=128),
          text=_clip_text(vocab_size=1024, block_size=32, n_embd=64, n_layer=2, n_head=4, intermediate_size=128,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0),
          projection_dim=64)


class CLIP(nn.Module):
    """Dual encoder: ``encode_image``, ``encode_text``, ``forward -> (logits_per_image, logits_per_text)``."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        c = self.config = config
        self.vision = build_tower(c.vision)
        self.text = build_tower(c.text)
        self.visual_projection = nn.Linear(self.vision.output_dim, c.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text.output_dim, c.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        # SigLIP's learnable bias (polymodal.models.contrastive.siglip_loss); absent for InfoNCE
        self.logit_bias = nn.Parameter(torch.tensor(float(c.logit_bias_init))) if c.logit_bias_init is not None else None
        nn.init.normal_(self.visual_projection.weight, std=self.vision.output_dim ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=self.text.output_dim ** -0.5)

    def train(self, mode: bool = True) -> "CLIP":
        """A frozen part of a tower (a LiT-locked tower, the early blocks of a partially tuned one) is
        a fixed function, so it stays in eval mode (no dropout, stochastic depth or batch statistics:
        its cached features stay valid); with ``frozen_bn`` every BatchNorm keeps its statistics."""
        super().train(mode)
        if mode:
            for tower in (self.vision, self.text):
                _frozen_to_eval(tower)
                if self.config.frozen_bn:
                    for m in tower.modules():
                        if isinstance(m, nn.modules.batchnorm._BatchNorm):
                            m.eval()
        return self

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings (B, projection_dim); HF ``get_image_features`` when not normalised."""
        z = self.visual_projection(self.vision.encode(pixel_values))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = False) -> torch.Tensor:
        """Text embeddings (B, projection_dim); HF ``get_text_features`` when not normalised."""
        z = self.text_projection(self.text.encode(input_ids, attention_mask))
        return F.normalize(z, dim=-1) if normalize else z

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """exp(t) * cosine similarity, (n_images, n_texts)."""
        image_embeds = F.normalize(image_embeds, dim=-1)
        text_embeds = F.normalize(text_embeds, dim=-1)
        return self.logit_scale.exp() * image_embeds @ text_embeds.t()

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, text_features: torch.Tensor | None = None,
                return_embeddings: bool = False, image_features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text); with ``return_embeddings`` the projected (not yet
        normalised) (image_embeds, text_embeds) instead, which the contrastive loss gathers across
        ranks: training calls the model itself, so DDP sees one forward. ``text_features`` /
        ``image_features``: a tower's pooled output computed beforehand (a locked tower's cache);
        only the projection runs."""
        if image_features is not None:
            img = self.visual_projection(image_features.to(self.visual_projection.weight.dtype))
        else:
            img = self.encode_image(pixel_values)
        if text_features is not None:
            txt = self.text_projection(text_features.to(self.text_projection.weight.dtype))
        else:
            txt = self.encode_text(input_ids, attention_mask)
        if return_embeddings:
            return img, txt
        logits_per_image = self.similarity(img, txt)
        return logits_per_image, logits_per_image.t()

    def no_weight_decay(self) -> set[str]:
        """The temperature (and SigLIP's bias) are scalars of the loss, not weights to shrink (timm's
        convention: names relative to this module; the towers list their own)."""
        return {"logit_scale"} | ({"logit_bias"} if self.logit_bias is not None else set())

    def prepack(self) -> bool:
        """fp32 CPU inference: prepacks the image tower's weights (``ViT.prepack``) when it can."""
        fn = getattr(self.vision, "prepack", None)
        return bool(fn is not None and fn())

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """CLIP (sec. 2.5) clips the logit scale at 100 so training stays stable; call after each step."""
        self.logit_scale.clamp_(0, self.config.logit_scale_max)


def _frozen_to_eval(module: nn.Module) -> None:
    """Puts every sub-module whose parameters are all frozen into eval mode (the largest such ones)."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _frozen_to_eval(child)


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of the image->text and text->image cross-entropies,
    the i-th image matching the i-th text (CLIP fig. 3)."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    logits = logits_per_image.float()
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# ALIGN-style towers (a conv-net image tower, our Encoder as a mean-pooled text tower):
# polymodal.models.contrastive, which does not import this module.
from .contrastive import TOWER_CONFIGS as _CONTRASTIVE_CONFIGS, TOWERS as _CONTRASTIVE_TOWERS  # noqa: E402

TOWER_CONFIGS.update(_CONTRASTIVE_CONFIGS)
TOWERS.update(_CONTRASTIVE_TOWERS)
