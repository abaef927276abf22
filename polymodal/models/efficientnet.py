"""EfficientNet-Lite (Tan & Le, 2019, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks"; the Lite variants of the TensorFlow TPU repository's ``efficientnet/lite``).

The B0 backbone is a 3x3 stride-2 stem, seven stages of MBConv blocks (Sandler et al., 2018,
"MobileNetV2", table 1: 1x1 expansion -> k x k depthwise -> linear 1x1 projection, a residual
when the shape is kept) and a 1x1 head conv, global average pooling and a linear classifier.
Compound scaling (Tan & Le, eq. 3) widens every stage by ``w`` and deepens it by ``d``:

    channels  c -> round8(w c)   (to a multiple of 8, never more than 10% below w c)
    repeats   r -> ceil(d r)

Lite differs from EfficientNet-B for mobile accelerators and int8 quantisation: no
squeeze-and-excitation, ReLU6 instead of swish, and the stem (32 channels), the head (1280
channels) and the repeats of the first and last stage are not scaled ("fixed stem and head").

BatchNorm is folded into the convolutions in ``eval()`` mode (:class:`polymodal.nn.conv.ConvBN`),
activations run channels-last (NHWC, what cuDNN's and oneDNN's fast convolution kernels want), and
``features(x)`` returns the maps at strides 8, 16 and 32 for a detection neck. Preprocessing (size,
resize, crop, interpolation, mean/std) is part of the config, so
``polymodal.data.images.ImageProcessor.from_config(config)`` prepares images as the weights expect:
for the TF-trained Lite checkpoints that is a bicubic resize of the short side to S + 32, a central
S x S crop and (x - 127) / 128 per channel (the TF repository's ``MEAN_RGB``/``STDDEV_RGB`` for Lite).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..nn.conv import ConvBN, drop_path
from .config import ConfigBase

# (repeats, kernel, stride, expand ratio, output channels) of the seven B0 stages (Tan & Le, table 1)
B0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
             (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
LITE_MEAN = (127 / 255,) * 3  # TF efficientnet/lite: (x - 127) / 128 on 0..255 pixels
LITE_STD = (128 / 255,) * 3
FEATURE_STRIDES = (8, 16, 32)


@dataclasses.dataclass
class EfficientNetConfig(ConfigBase):
    family: ClassVar[str] = "efficientnet"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    width_mult: float = 1.0
    depth_mult: float = 1.0
    stages: tuple[tuple[int, ...], ...] = B0_STAGES
    stem_channels: int = 32
    head_channels: int = 1280
    scale_stem_head: bool = False  # Lite: stem and head keep 32 / 1280 channels
    fix_first_last: bool = True  # Lite: the first and last stage keep their repeats
    divisor: int = 8
    act: str = "relu6"
    padding: str = "same"  # same (TF SAME, as the ported weights were trained) | symmetric (k // 2, timm)
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01  # PyTorch's convention: 1 - TF's 0.99
    num_channels: int = 3
    num_labels: int = 1000  # 0: no classifier, forward() returns the pooled features
    labels: str | None = "imagenet"  # the class names of the head (polymodal/data/imagenet_classes.txt)
    id2label: dict[str, str] | None = None  # explicit class names (a fine-tuned head) win over `labels`
    dropout: float = 0.2  # before the classifier
    drop_path: float = 0.2  # stochastic depth of the last block; block i gets drop_path * i / n_blocks
    channels_last: bool = True
    # preprocessing that travels with the weights (polymodal.data.images.ImageProcessor.from_config)
    image_size: int = 224
    resize_size: int | None = 256
    resize_mode: str = "shortest"
    center_crop: bool = True
    resample: str = "bicubic"
    image_mean: tuple[float, ...] = LITE_MEAN
    image_std: tuple[float, ...] = LITE_STD

    def __post_init__(self):
        self.stages = tuple(tuple(int(v) for v in s) for s in self.stages)  # JSON gives lists
        if not self.stages or any(len(s) != 5 or min(s) < 1 for s in self.stages):
            raise ValueError(f"stages must be (repeats, kernel, stride, expand, channels) tuples of positive "
                             f"ints, got {self.stages}")
        if self.padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {self.padding!r}")
        if self.width_mult <= 0 or self.depth_mult <= 0:
            raise ValueError(f"width_mult and depth_mult must be positive, got {self.width_mult}, {self.depth_mult}")
        if not 0.0 <= self.drop_path < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout and drop_path must be in [0, 1), got {self.dropout}, {self.drop_path}")

    def round_channels(self, c: int) -> int:
        """round8(w c) of compound scaling (TF ``round_filters``)."""
        v = c * self.width_mult
        out = max(self.divisor, int(v + self.divisor / 2) // self.divisor * self.divisor)
        return int(out + self.divisor if out < 0.9 * v else out)

    def block_specs(self) -> list[tuple[int, int, int, int, int, int]]:
        """(stage, in_channels, out_channels, kernel, stride, expand) of every block, in order."""
        specs, c_in = [], self.stem
        for i, (r, k, s, e, c) in enumerate(self.stages):
            fixed = self.fix_first_last and i in (0, len(self.stages) - 1)
            repeats = r if fixed else int(math.ceil(self.depth_mult * r))
            c_out = self.round_channels(c)
            for j in range(repeats):
                specs.append((i, c_in, c_out, k, s if j == 0 else 1, e))
                c_in = c_out
        return specs

    @property
    def stem(self) -> int:
        return self.round_channels(self.stem_channels) if self.scale_stem_head else self.stem_channels

    @property
    def head(self) -> int:
        return self.round_channels(self.head_channels) if self.scale_stem_head else self.head_channels


def _register(name: str, width: float, depth: float, size: int, dropout: float):
    # efficientnet_lite_builder.py: (width, depth, resolution, dropout); eval crop = S / (S + 32)
    EfficientNetConfig.presets[name] = dict(width_mult=width, depth_mult=depth, image_size=size,
                                            resize_size=size + 32, dropout=dropout)


_register("efficientnet-lite0", 1.0, 1.0, 224, 0.2)
_register("efficientnet-lite1", 1.0, 1.1, 240, 0.2)
_register("efficientnet-lite2", 1.1, 1.2, 260, 0.3)
_register("efficientnet-lite3", 1.2, 1.4, 280, 0.3)
_register("efficientnet-lite4", 1.4, 1.8, 300, 0.3)


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2 fig. 3b): expand -> depthwise -> linear projection (+ x)."""

    def __init__(self, c: EfficientNetConfig, c_in: int, c_out: int, kernel: int, stride: int, expand: int,
                 drop: float):
        super().__init__()
        kw = dict(padding=c.padding, eps=c.bn_eps, momentum=c.bn_momentum, channels_last=c.channels_last)
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid, 1, act=c.act, **kw) if expand != 1 else None
        self.dw = ConvBN(mid, mid, kernel, stride, groups=mid, act=c.act, **kw)
        self.project = ConvBN(mid, c_out, 1, act=None, **kw)  # linear bottleneck: no activation
        self.residual = stride == 1 and c_in == c_out
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(x if self.expand is None else self.expand(x)))
        return drop_path(y, self.drop, self.training) + x if self.residual else y


class EfficientNet(nn.Module):
    """EfficientNet-Lite: ``forward`` -> logits (B, num_labels), or pooled features (B, head) without
    a head; ``encode`` -> pooled features; ``forward_features`` -> the head's map (B, head, H/32, W/32);
    ``features`` -> the maps at strides 8, 16, 32."""

    def __init__(self, config: EfficientNetConfig):
        super().__init__()
        c = self.config = config
        kw = dict(padding=c.padding, eps=c.bn_eps, momentum=c.bn_momentum, channels_last=c.channels_last)
        specs = c.block_specs()
        self.stem = ConvBN(c.num_channels, c.stem, 3, 2, act=c.act, **kw)
        self.blocks = nn.ModuleList(
            MBConv(c, c_in, c_out, k, s, e, c.drop_path * i / len(specs))
            for i, (_, c_in, c_out, k, s, e) in enumerate(specs))
        self.head = ConvBN(specs[-1][2], c.head, 1, act=c.act, **kw)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.head, c.num_labels) if c.num_labels > 0 else None
        # the last block at each output stride, and its channels (for a detection neck)
        stride, last = 2, {}
        for i, (_, _, c_out, _, s, _) in enumerate(specs):
            stride *= s
            last[stride] = (i, c_out)
        self.feature_blocks = tuple(last[s][0] for s in FEATURE_STRIDES)
        self.feature_channels = tuple(last[s][1] for s in FEATURE_STRIDES)
        self.feature_strides = FEATURE_STRIDES
        self.reset_parameters()

    @property
    def output_dim(self) -> int:
        return self.config.head

    def reset_parameters(self) -> None:
        """TF's EfficientNet init: conv ~ N(0, 2 / fan_out) (He et al., 2015, fan-out mode), dense
        ~ U(+-1 / sqrt(out)), BatchNorm gamma = 1, beta = 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.num_channels:
            raise ValueError(f"expected images (B, {self.config.num_channels}, H, W), got {tuple(x.shape)}")
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps at strides 8, 16 and 32 (``feature_channels`` channels each)."""
        x, out, want = self.stem(self._input(x)), [], set(self.feature_blocks)
        for i, blk in enumerate(self.blocks[:self.feature_blocks[-1] + 1]):
            x = blk(x)
            if i in want:
                out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self._input(x))
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled image features (B, head): the tower interface the dual encoders use."""
        return self.forward_features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.encode(x)
        return pooled if self.classifier is None else self.classifier(self.dropout(pooled))

    def fold_bn(self, enabled: bool = True) -> "EfficientNet":
        """Whether ``eval()`` runs BatchNorm folded into the convolutions (the default) or the
        separate conv -> BN reference path."""
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.fold = enabled
        return self

    def labels(self) -> list[str] | None:
        """The class names of the head: ``id2label``, or the named label set (``imagenet``)."""
        c = self.config
        if c.id2label:
            return [c.id2label.get(str(i), str(i)) for i in range(c.num_labels)]
        if c.labels == "imagenet" and c.num_labels == 1000:
            from ..data.imagenet import imagenet_labels

            return imagenet_labels()
        return None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def no_weight_decay(self) -> set[str]:
        """Depthwise filters and BatchNorm parameters: MobileNet (Howard et al., 2017, sec. 3.4) puts
        "very little or no weight decay" on the depthwise filters, which hold few parameters each."""
        out = set()
        for name, m in self.named_modules():
            if isinstance(m, ConvBN):
                out |= {f"{name}.bn.weight", f"{name}.bn.bias"}
                if m.conv.groups > 1:
                    out.add(f"{name}.conv.weight")
        return out
