"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words", eq. 1-4).

An image x in R^{H x W x C} is cut into N = HW / P^2 patches x_p^i of P x P pixels;
each is flattened and linearly projected (a P x P convolution with stride P is the
same linear map E), a learned class token is prepended and learned 1-D position
embeddings are added (eq. 1):

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
    z'_l = MSA(LN(z_{l-1})) + z_{l-1},   z_l = MLP(LN(z'_l)) + z'_l      (eq. 2-3, pre-norm nn.Block)
    y = LN(z_L^0)                                                         (eq. 4)

Attention is bidirectional and nothing is padded, so every block calls SDPA with
no mask (the fused kernel's fast path). At another resolution the position table
is resized as a 2-D grid with bicubic interpolation (sec. 3.2, "2D interpolation
of the pre-trained position embeddings"), exactly as DINO / Hugging Face do.

The same class is CLIP's image tower (Radford et al., 2021): ``pre_norm`` adds the
extra LayerNorm CLIP applies to z_0 (HF ``pre_layrnorm``), ``patch_bias=False`` and
``final_norm="pooled"`` apply the last LayerNorm to the class token only
(HF ``post_layernorm``). ``pool="mean"`` averages the patch tokens instead of
reading the class token (the ablation of the paper's appendix D.3, and what small
CIFAR models often use).

``stem="conv"`` replaces the single P x P patchify convolution by a convolutional stem
(Xiao et al., 2021, "Early Convolutions Help Transformers See Better", sec. 3; the ViT
paper's "hybrid" of sec. 3.1 with a few convolutions instead of a ResNet): a short stack of
3 x 3 convolutions, each followed by BatchNorm (or GroupNorm) and ReLU (or GELU), whose
stride-2 stages shrink the image by exactly P, then a 1 x 1 convolution to D. It ends at the
same (H / P) x (W / P) token grid, so the class token, the position table (and its
interpolation) and the blocks are unchanged. Overlapping 3 x 3 filters give the locality
prior a patchify stem lacks, which is what lets a ViT learn from few images (Xiao et al.,
fig. 1 and sec. 5: faster, more stable optimisation and better accuracy). The default
``stem="patch"`` keeps the layout of every existing checkpoint and of the Hugging Face
ViT/CLIP weights (a conv-stem model has no ``patch_embed`` tensor, so those maps refuse it).

Image preprocessing (size, interpolation, mean/std) is part of the config, so
``polymodal.data.images.ImageProcessor.from_config(config)`` prepares inputs the
way the weights expect.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Block, make_norm
from .config import ConfigBase

IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # google/vit-* preprocessor_config.json


@dataclasses.dataclass
class ViTConfig(ConfigBase):
    family: ClassVar[str] = "vit"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    intermediate_size: int | None = None  # default 4 * n_embd
    activation: str = "gelu"
    norm_eps: float = 1e-12
    qkv_bias: bool = True
    patch_bias: bool = True
    class_token: bool = True
    pool: str = "cls"  # cls | mean
    pre_norm: bool = False  # CLIP's LayerNorm on the embeddings before the blocks
    final_norm: str = "all"  # all (ViT: every token) | pooled (CLIP: the pooled token) | none
    pooler: bool = False  # HF ViTModel's dense + tanh on the class token
    num_labels: int = 0  # > 0 adds a linear classification head on the pooled features
    dropout: float = 0.0
    init_std: float = 0.02
    # token embedding: "patch" (one P x P / stride P convolution) or "conv" (Xiao et al., 2021)
    stem: str = "patch"
    stem_channels: tuple[int, ...] = ()  # conv: output channels of each 3x3 conv (default: doubling up to n_embd)
    stem_strides: tuple[int, ...] = ()  # conv: 1 or 2 per conv, product = patch_size (default: 1s, then 2s)
    stem_norm: str = "batchnorm"  # conv: batchnorm | groupnorm
    stem_act: str = "relu"  # conv: relu | gelu
    # preprocessing that travels with the weights (see polymodal.data.images)
    image_mean: tuple[float, ...] = IMAGENET_STANDARD
    image_std: tuple[float, ...] = IMAGENET_STANDARD
    resample: str = "bilinear"
    resize_mode: str = "square"  # square | shortest (then center crop)
    resize_size: int | None = None
    center_crop: bool = False
    id2label: dict[str, str] | None = None

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True")
        if self.final_norm not in ("all", "pooled", "none"):
            raise ValueError(f"final_norm must be 'all', 'pooled' or 'none', got {self.final_norm!r}")
        self._check_stem()

    def _check_stem(self) -> None:
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "patch":
            if self.stem_channels or self.stem_strides:
                raise ValueError("stem_channels / stem_strides are set but stem='patch' (use stem='conv')")
            return
        if self.stem_norm not in ("batchnorm", "groupnorm"):
            raise ValueError(f"stem_norm must be 'batchnorm' or 'groupnorm', got {self.stem_norm!r}")
        if self.stem_act not in ("relu", "gelu"):
            raise ValueError(f"stem_act must be 'relu' or 'gelu', got {self.stem_act!r}")
        if any(int(ch) < 1 for ch in self.stem_channels):
            raise ValueError(f"stem_channels must be positive, got {self.stem_channels}")
        if self.stem_strides:
            if len(self.stem_strides) != len(self.stem_channels):
                raise ValueError(f"stem_strides {self.stem_strides} needs one stride per stem_channels entry "
                                 f"{self.stem_channels}")
            if any(s not in (1, 2) for s in self.stem_strides) or math.prod(self.stem_strides) != self.patch_size:
                raise ValueError(f"stem_strides {self.stem_strides} must be 1s and 2s whose product is "
                                 f"patch_size={self.patch_size}")
            return
        k = self.patch_size.bit_length() - 1
        if self.patch_size != 1 << k:
            raise ValueError(f"stem='conv' with default strides needs a power-of-2 patch_size, got {self.patch_size} "
                             "(or give stem_strides)")
        if self.stem_channels and len(self.stem_channels) < k:
            raise ValueError(f"stem_channels {self.stem_channels} has {len(self.stem_channels)} convs; patch_size="
                             f"{self.patch_size} needs at least {k} stride-2 ones")

    @property
    def stem_layers(self) -> list[tuple[int, int]]:
        """(out_channels, stride) of each 3x3 conv of the conv stem (empty for the patch stem).

        Defaults follow Xiao et al. (table 1): log2(P) stride-2 convs whose widths double up to
        n_embd; given widths beyond log2(P) run first at stride 1 (full resolution)."""
        if self.stem != "conv":
            return []
        k = max(0, self.patch_size.bit_length() - 1)
        chans = [int(ch) for ch in self.stem_channels] or [max(1, self.n_embd >> (k - 1 - i)) for i in range(k)]
        strides = [int(s) for s in self.stem_strides] or [1] * (len(chans) - k) + [2] * k
        return list(zip(chans, strides))

    @property
    def hidden(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_positions(self) -> int:
        return self.grid ** 2 + int(self.class_token)


def _register(name: str, **kw):
    ViTConfig.presets[name] = kw


# google/vit-base-patch16-224 config.json (+ preprocessor_config.json: 224x224 bilinear, mean=std=0.5)
_register("vit-base-patch16-224", image_size=224, patch_size=16, n_embd=768, n_layer=12, n_head=12,
          intermediate_size=3072, activation="gelu", norm_eps=1e-12, qkv_bias=True, num_labels=1000)
# google/vit-base-patch16-224-in21k: same trunk, with HF's pooler and no head
_register("vit-base-patch16-224-in21k", image_size=224, patch_size=16, n_embd=768, n_layer=12, n_head=12,
          intermediate_size=3072, norm_eps=1e-12, pooler=True)
# CPU-sized presets for 32x32 CIFAR images: 8x8 = 64 patches of 4x4 pixels.
_cifar = dict(image_size=32, patch_size=4, num_labels=10, resize_mode="square", resample="bilinear",
              image_mean=(0.4914, 0.4822, 0.4465), image_std=(0.2470, 0.2435, 0.2616), norm_eps=1e-6)
_register("vit-tiny-cifar", n_embd=192, n_layer=6, n_head=3, intermediate_size=384, dropout=0.1, **_cifar)
_register("vit-nano-cifar", n_embd=64, n_layer=2, n_head=4, intermediate_size=128, pool="mean", **_cifar)
# Conv-stem ViT for CIFAR from 1,000 images (Xiao et al., 2021): one full-resolution 3x3 conv, two
# stride-2 ones (32 -> 16 -> 8, the same 8x8 grid as 4x4 patches), BatchNorm + ReLU, a 1x1 conv to
# 128. The trunk is narrow (128 wide, 6 blocks) so ~100 epochs fit in 15 minutes of one CPU
# thread; mean pooling and no dropout (the augmentation of train-vit regularises).
_register("vit-tiny-cifar-conv", n_embd=128, n_layer=6, n_head=4, intermediate_size=256, pool="mean",
          class_token=False, stem="conv", stem_channels=(32, 64, 128), stem_strides=(1, 2, 2), **_cifar)


class ConvStem(nn.Module):
    """The convolutional stem of Xiao et al. (2021, sec. 3): (3x3 conv -> norm -> act) per
    ``config.stem_layers``, then a 1x1 conv to n_embd. (B, C, H, W) -> (B, D, H / P, W / P).

    The 3x3 convs have no bias (the norm that follows has one); the 1x1 projection is the
    stem's only linear map into the token space, like the patch embedding it replaces."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = config
        layers: list[nn.Module] = []
        ch_in = c.num_channels
        for ch, stride in c.stem_layers:
            layers.append(nn.Conv2d(ch_in, ch, 3, stride=stride, padding=1, bias=False))
            # GroupNorm: up to 32 groups (Wu & He, 2018), a divisor of the width so any width works
            layers.append(nn.BatchNorm2d(ch) if c.stem_norm == "batchnorm" else nn.GroupNorm(math.gcd(ch, 32), ch))
            layers.append(nn.ReLU() if c.stem_act == "relu" else nn.GELU())
            ch_in = ch
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(ch_in, c.n_embd, 1, bias=c.patch_bias)

    def reset_parameters(self) -> None:
        # He init for the conv -> norm -> ReLU stages (He et al., 2015), as Xiao et al. train them;
        # the ViT's std-0.02 init would make these scale-invariant (normed) weights tiny and their
        # effective step size under AdamW huge. The 1x1 projection keeps the ViT init (set by ViT).
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(x))


class ViT(nn.Module):
    """``forward(pixel_values)`` -> logits (B, num_labels) when the config has a head,
    else the last hidden states (B, 1 + N, D); ``encode`` -> pooled features (B, D)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        if c.stem == "conv":
            self.stem = ConvStem(c)
        else:
            # Kept as a Conv2d parameter (the checkpoint layout), applied as unfold + GEMM in forward.
            self.patch_embed = nn.Conv2d(c.num_channels, c.n_embd, c.patch_size, stride=c.patch_size,
                                         bias=c.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(c.n_embd)) if c.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(c.n_positions, c.n_embd))
        self.drop = nn.Dropout(c.dropout)
        self.ln_pre = make_norm("layernorm", c.n_embd, c.norm_eps) if c.pre_norm else None
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.hidden, norm="layernorm", norm_eps=c.norm_eps, act=c.activation,
                  qkv_bias=c.qkv_bias, prenorm=True, dropout=c.dropout, layer_idx=i)
            for i in range(c.n_layer)
        )
        self.ln_f = make_norm("layernorm", c.n_embd, c.norm_eps) if c.final_norm != "none" else None
        self.pooler = nn.Linear(c.n_embd, c.n_embd) if c.pooler else None
        self.head = nn.Linear(c.n_embd, c.num_labels) if c.num_labels > 0 else None
        self._packs: list | None = None  # see prepack()
        self.reset_parameters()

    @property
    def output_dim(self) -> int:
        return self.config.n_embd

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.config.stem == "conv":
            self.stem.reset_parameters()
        nn.init.trunc_normal_(self.pos_embed, std=std, a=-2 * std, b=2 * std)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=std, a=-2 * std, b=2 * std)

    # -- embeddings --------------------------------------------------------------
    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D), N = (H / P) (W / P) tokens in row-major grid order.

        Patch stem: the P x P / stride P convolution written as unfold + GEMM. Non-overlapping
        patches make the convolution a plain matrix product of the flattened patches with E
        (eq. 1); one GEMM is faster on CPU than the convolution kernel, and the weight keeps
        the Conv2d layout (D, C, P, P) that checkpoints use. Conv stem: see ``ConvStem``."""
        b, ch, h, w = pixel_values.shape
        p = self.config.patch_size
        if ch != self.config.num_channels:
            raise ValueError(f"pixel_values have {ch} channels, the model expects {self.config.num_channels}")
        if h % p or w % p:
            raise ValueError(f"image of {h}x{w} pixels is not a multiple of the {p}x{p} patch size")
        if self.config.stem == "conv":
            x = self.stem(pixel_values.to(self.stem.proj.weight.dtype))
            return x.flatten(2).transpose(1, 2)
        x = pixel_values.reshape(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # B, gh, gw, C, P, P
        x = x.reshape(b, (h // p) * (w // p), ch * p * p)
        wgt = self.patch_embed.weight
        return F.linear(x.to(wgt.dtype), wgt.reshape(wgt.shape[0], -1), self.patch_embed.bias)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position table (n_cls + grid_h * grid_w, D) for another patch grid.

        The trained table is a g x g grid (plus the class token's row, kept as is); it is
        resized with bicubic interpolation, align_corners=False, like DINO and Hugging Face's
        ``interpolate_pos_encoding`` (same F.interpolate call, so outputs agree)."""
        c = self.config
        g = c.grid
        if grid_h == g and grid_w == g:
            return self.pos_embed
        n_cls = int(c.class_token)
        cls_pos, patch_pos = self.pos_embed[:n_cls], self.pos_embed[n_cls:]
        d = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, g, g, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, d)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """z_0 of eq. 1 (after CLIP's pre-norm when configured): (B, n_cls + N, D)."""
        c = self.config
        p = c.patch_size
        x = self.patchify(pixel_values)
        b = x.shape[0]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(b, 1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(pixel_values.shape[2] // p, pixel_values.shape[3] // p).to(x.dtype)
        x = self.drop(x)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return x

    # -- trunk -------------------------------------------------------------------
    def hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, n_cls + N, D): final-normed when ``final_norm='all'`` (ViT),
        the raw last block output otherwise (CLIP's ``last_hidden_state``)."""
        x = self.embed(pixel_values)
        packs = self._active_packs(x)
        for i, blk in enumerate(self.blocks):
            # no mask: bidirectional, nothing padded -> SDPA fast path
            x = blk(x) if packs is None else _block_forward(blk, x, packs[i])
        if self.config.final_norm == "all":
            x = self.ln_f(x)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D): class token or mean of the patch tokens, then CLIP's post-norm
        or HF's tanh pooler where configured."""
        c = self.config
        if c.pool == "cls":
            x = hidden[:, 0]
        else:
            x = hidden[:, int(c.class_token):].mean(dim=1)
        if c.final_norm == "pooled":
            x = self.ln_f(x)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return x

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled image features (B, D): the tower interface the dual encoders use.

        With class-token pooling and no final norm over every token, only the class
        token's row of the last block is ever read, so that block computes its query,
        attention output and MLP for that one token (keys/values still for all): the
        result is identical and the last layer costs ~1/4 of a full one."""
        c = self.config
        if (c.pool != "cls" or c.final_norm == "all" or not self.blocks or (self.training and c.dropout > 0)
                or not self._sdpa_only()):
            return self.pool(self.hidden_states(pixel_values))
        x = self.embed(pixel_values)
        packs = self._active_packs(x) or [None] * len(self.blocks)
        for blk, pack in zip(self.blocks[:-1], packs):
            x = blk(x) if pack is None else _block_forward(blk, x, pack)
        return self.pool(_block_forward(self.blocks[-1], x, packs[-1], first_only=True))

    # -- CPU inference: prepacked weights -------------------------------------------
    def prepack(self, tokens_hint: int | None = None) -> bool:
        """Prepacks every block's Linear weights into oneDNN's blocked layout and fuses the
        bias and the MLP activation into the GEMM (what inductor's CPU freezing pass does).

        Used only for fp32 CPU inference without autograd (``torch.inference_mode`` / ``no_grad``,
        ``eval()``); any change to the weights (an optimiser step, ``load_state_dict``, ``.to()``)
        invalidates the packs and the plain path runs. Costs a second copy of the block weights.
        Returns False where torch has no oneDNN linear ops (then nothing changes)."""
        if not _mkldnn_linear_available():
            return False
        hint = tokens_hint or 8 * self.config.n_positions
        with torch.no_grad():
            self._packs = [_CPUPack(blk, hint) for blk in self.blocks]
        return True

    def unpack(self) -> None:
        self._packs = None

    def _sdpa_only(self) -> bool:
        """The shortcuts call SDPA directly; the reference path (attention maps) must run as is."""
        return all(blk.attn.impl == "sdpa" for blk in self.blocks)

    def _active_packs(self, x: torch.Tensor) -> list | None:
        packs = self._packs
        if (packs is None or self.training or torch.is_grad_enabled() or x.device.type != "cpu"
                or x.dtype != torch.float32 or not self._sdpa_only()):
            return None
        if not all(pk.valid(blk) for pk, blk in zip(packs, self.blocks)):
            self._packs = None  # stale: weights changed since packing
            return None
        return packs

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.hidden_states(pixel_values)
        return self.head(self.pool(self.hidden_states(pixel_values)))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def no_weight_decay(self) -> set[str]:
        """Bare parameters the optimizer must not decay (timm's convention, names relative to this
        module): the position table and the class token are embeddings, not weight matrices."""
        return {"pos_embed"} | ({"cls_token"} if self.cls_token is not None else set())


def _mkldnn_linear_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and ops is not None
                    and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


# our activation -> (oneDNN post-op, algorithm, input scale s): act(z) = post_op(s * z) / s.
# quick_gelu(z) = z * sigmoid(1.702 z) = swish(1.702 z) / 1.702, so the packed fc weights are
# scaled by 1.702 and the packed fc2 weights by 1 / 1.702: exact algebra, fused in the GEMM.
_POST_OPS = {"gelu": ("gelu", "none", 1.0), "gelu_tanh": ("gelu", "tanh", 1.0), "relu": ("relu", "", 1.0),
             "silu": ("swish", "", 1.0), "quick_gelu": ("swish", "", 1.702)}


class _CPUPack:
    """oneDNN-prepacked fp32 copies of one pre-norm ``Block``'s Linear weights."""

    def __init__(self, blk: Block, tokens_hint: int):
        if not blk.prenorm or blk.cross_attn is not None or not hasattr(blk.mlp, "act_name") \
                or blk.mlp.act_name not in _POST_OPS or type(blk.mlp).__name__ != "MLP":
            raise ValueError("prepack supports pre-norm self-attention blocks with a plain MLP")
        mk = torch.ops.mkldnn
        self.params = [(p, p._version, p.data_ptr()) for p in blk.parameters()]
        self.post_op, self.algorithm, s = _POST_OPS[blk.mlp.act_name]

        def pack(lin: nn.Linear, w_scale: float = 1.0, b_scale: float = 1.0):
            w = (lin.weight.detach().float() * w_scale).contiguous()
            b = None if lin.bias is None else lin.bias.detach().float() * b_scale
            return mk._reorder_linear_weight(w, tokens_hint), b

        self.qkv = pack(blk.attn.qkv)
        self.proj = pack(blk.attn.proj)
        self.fc = pack(blk.mlp.fc, s, s)  # s * (W x + b)
        self.fc2 = pack(blk.mlp.proj, 1.0 / s)  # W2 (post_op(.) / s) + b2

    def valid(self, blk: Block) -> bool:
        """Same Parameter objects, same storage (``.to()`` swaps ``.data``), no in-place change since packing."""
        cur = list(blk.parameters())
        return len(cur) == len(self.params) and all(
            p is q and p._version == v and q.data_ptr() == ptr for (p, v, ptr), q in zip(self.params, cur))

    def linear(self, x: torch.Tensor, packed, post_op: str = "none", algorithm: str = "") -> torch.Tensor:
        w, b = packed
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, post_op, [], algorithm)
        return y.view(*x.shape[:-1], y.shape[-1])


def _block_forward(blk: Block, x: torch.Tensor, pack: _CPUPack | None = None, first_only: bool = False) -> torch.Tensor:
    """A pre-norm, unmasked ``Block`` (eq. 2-3), optionally through prepacked weights and optionally
    for the query at position 0 only (keys/values from every token): (B, T, D) -> (B, T or 1, D)."""
    if pack is None and not first_only:
        return blk(x)
    a = blk.attn
    b, t, _ = x.shape
    qd, kvd = a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    h = blk.norm1(x)
    if pack is None:
        w, bias = a.qkv.weight, a.qkv.bias
        q = F.linear(h[:, :1], w[:qd], None if bias is None else bias[:qd])
        k, v = F.linear(h, w[qd:], None if bias is None else bias[qd:]).split(kvd, dim=-1)
    else:
        q, k, v = pack.linear(h, pack.qkv).split([qd, kvd, kvd], dim=-1)
        if first_only:
            q = q[:, :1]
    tq = q.shape[1]
    q = q.reshape(b, tq, a.n_head, a.head_dim).transpose(1, 2)
    k = k.reshape(b, t, a.n_kv_head, a.head_dim).transpose(1, 2)
    v = v.reshape(b, t, a.n_kv_head, a.head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, scale=a.scale, enable_gqa=a.n_head != a.n_kv_head)
    y = y.transpose(1, 2).reshape(b, tq, qd)
    if first_only:
        x = x[:, :1]
    if pack is None:
        x = x + a.proj(y)
        return x + blk.mlp(blk.norm2(x))
    x = x + pack.linear(y, pack.proj)
    hid = pack.linear(blk.norm2(x), pack.fc, pack.post_op, pack.algorithm)
    return x + pack.linear(hid, pack.fc2)
