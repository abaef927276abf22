"""Convolution + BatchNorm + activation, with BatchNorm folded into the convolution for inference.

BatchNorm at inference is a fixed per-channel affine map of the convolution's output
(Ioffe & Szegedy, 2015, "Batch Normalization", alg. 2, step 11):

    BN(z)_c = gamma_c (z_c - mu_c) / sqrt(var_c + eps) + beta_c,      z = W * x

so ``BN(W * x)`` is one convolution with rescaled filters and a bias (Jacob et al., 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
sec. 3.2, "batch normalization folding"):

    s_c = gamma_c / sqrt(var_c + eps),     W'_c = s_c W_c,     b'_c = beta_c - s_c mu_c

:class:`ConvBN` keeps ``conv`` and ``bn`` as the parameters of record (the checkpoint layout, the
training path) and, in ``eval()`` mode, runs the folded convolution instead: one kernel with a
fused bias, no separate normalisation pass. The folded tensors are cached and rebuilt whenever a
parameter or running statistic changes (``load_state_dict``, an optimiser step, ``.to()``).
Where autograd needs gradients through a frozen-statistics BatchNorm (fine-tuning in eval mode)
the fold is recomputed differentiably instead of cached; ``fold = False`` forces the unfolded
path (the reference the tests compare the folded one against).

TensorFlow's ``padding="SAME"`` (what the EfficientNet weights ported from TF were trained with)
pads ``max((ceil(i / s) - 1) s + k - i, 0)`` pixels, the odd one on the right/bottom; for a
stride-1 odd kernel that is the symmetric ``k // 2`` PyTorch padding, for a stride-2 3x3 on an even
image it is 0 left and 1 right, which ``F.pad`` applies before an unpadded convolution.

Stochastic depth (Huang et al., 2016, "Deep Networks with Stochastic Depth", eq. 2, in the
"drop connect" form of EfficientNet): a residual branch is dropped for a whole sample with
probability p and the kept ones are scaled by 1 / (1 - p), so the expectation is unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONV_ACTIVATIONS = {
    "relu6": lambda x, inplace: F.relu6(x, inplace=inplace),  # Lite: bounded for int8 quantisation
    "relu": lambda x, inplace: F.relu(x, inplace=inplace),
    "silu": lambda x, inplace: F.silu(x, inplace=inplace),  # EfficientNet-B's swish
}


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's "SAME" along one axis of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class ConvBN(nn.Module):
    """``act(BN(conv(x)))``, a bias-free k x k convolution (``groups`` = channels: depthwise).

    Args:
        padding: "same" (TensorFlow SAME, computed from each input's size) or "symmetric" (k // 2).
        act: "relu6", "relu", "silu" or None (the linear bottleneck of MobileNetV2)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: str | None = "relu6", padding: str = "same", eps: float = 1e-3, momentum: float = 0.01,
                 channels_last: bool = False):
        super().__init__()
        if padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")
        if act is not None and act not in CONV_ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose from {sorted(CONV_ACTIVATIONS)}")
        # SAME with stride 1 and an odd kernel is exactly the symmetric padding: let the conv do it
        self.dynamic_pad = padding == "same" and (stride > 1 or kernel % 2 == 0)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, groups=groups, bias=False,
                              padding=0 if self.dynamic_pad else kernel // 2)
        self.bn = nn.BatchNorm2d(c_out, eps=eps, momentum=momentum)
        self.act_name = act
        self.fold = True  # eval() runs the folded convolution; False forces conv -> BN (the reference)
        self.channels_last = channels_last
        self._folded: tuple | None = None  # (key, weight, bias): not in the state dict

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_pad:
            return x
        k, s = self.conv.kernel_size, self.conv.stride
        top, bottom = same_padding(x.shape[-2], k[0], s[0])
        left, right = same_padding(x.shape[-1], k[1], s[1])
        return F.pad(x, (left, right, top, bottom)) if top or bottom or left or right else x

    def _tensors(self) -> list[torch.Tensor]:
        bn = self.bn
        return [self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b') of the folded convolution, from the current weights and running statistics."""
        bn, w = self.bn, self.conv.weight
        dt = torch.promote_types(w.dtype, torch.float32)  # fold bf16 weights in fp32, fp64 ones in fp64
        scale = bn.weight.to(dt) * torch.rsqrt(bn.running_var.to(dt) + bn.eps)
        b = (bn.bias.to(dt) - bn.running_mean.to(dt) * scale).to(w.dtype)
        w = (w.to(dt) * scale.view(-1, 1, 1, 1)).to(w.dtype)
        if self.channels_last:
            w = w.contiguous(memory_format=torch.channels_last)
        return w, b

    def _cached_fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        ts = self._tensors()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in ts)
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, *self.folded())
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pad(x)
        if self.training or not self.fold:
            y, inplace = self.bn(self.conv(x)), False
        else:
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in self._tensors())
            w, b = self.folded() if needs_grad else self._cached_fold()
            c = self.conv
            y = F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
            inplace = not torch.is_grad_enabled()  # no autograd graph holds y: overwrite it
        return y if self.act_name is None else CONV_ACTIVATIONS[self.act_name](y, inplace)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch: zero it per sample with probability ``p``, scale the rest."""
    if not training or p <= 0.0:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep
