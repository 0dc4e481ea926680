"""Layers of the DDPM U-Net, after Ho et al. 2020's `diffusion_tf/models/unet.py`.

Initialisation follows the paper's code: weights `variance_scaling(1.0, "fan_avg", "uniform")`
(= Xavier uniform), biases zero, and the layers the paper creates with `init_scale=0.` zero: the
second conv of every residual block, the attention output projection and the final conv.
GroupNorm uses eps 1e-6, TensorFlow's `group_norm` default that the paper's checkpoints were trained with.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPNORM_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [sin(t f), cos(t f)], f_i = 10000^(-i / (dim/2 - 1))."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(steps * -(math.log(10000.0) / (half - 1)))  # (half,), in the paper's order of ops
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    return F.pad(emb, (0, dim % 2))  # (B, dim), zero-padded when dim is odd


def init_default(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    """Apply the paper's init to a Linear/Conv2d: Xavier uniform times sqrt(scale) (0 gives zeros), zero bias."""
    if scale == 0.0:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    nn.init.zeros_(layer.bias)
    return layer


def conv3x3(in_channels: int, out_channels: int, scale: float = 1.0, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, 'same' padding for stride 1 (stride 2 pads outside, see Downsample)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1 if stride == 1 else 0)
    return init_default(conv, scale)


def conv1x1(in_channels: int, out_channels: int, scale: float = 1.0) -> nn.Conv2d:
    """1x1 convolution, the paper's `nin` layer."""
    return init_default(nn.Conv2d(in_channels, out_channels, 1), scale)


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with the paper's epsilon."""
    return nn.GroupNorm(num_groups, channels, eps=GROUPNORM_EPS)


class TimestepEmbedding(nn.Module):
    """t (B,) -> temb (B, 4 ch): sinusoidal embedding, Dense, SiLU, Dense."""

    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.ch = ch
        self.dense = nn.ModuleList([init_default(nn.Linear(ch, temb_ch)), init_default(nn.Linear(temb_ch, temb_ch))])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) -> (B, temb_ch), in the dtype of the weights (float64 models work too)."""
        temb = timestep_embedding(t, self.ch).to(self.dense[0].weight.dtype)  # (B, ch)
        return self.dense[1](F.silu(self.dense[0](temb)))  # (B, temb_ch)


class ResnetBlock(nn.Module):
    """GN, SiLU, conv, + Dense(SiLU(temb)), GN, SiLU, dropout, zero-init conv; 1x1 shortcut if C changes."""

    def __init__(self, in_channels: int, out_channels: int, temb_ch: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.temb_proj = init_default(nn.Linear(temb_ch, out_channels))
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels, scale=0.0)
        self.nin_shortcut = conv1x1(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), temb_act = SiLU(temb) (B, temb_ch) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h += self.temb_proj(temb_act)[:, :, None, None]  # broadcast over H, W; in place: conv outputs
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # are not saved for backward
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual; q/k/v as one fused 1x1 conv."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.qkv = conv1x1(channels, 3 * channels)
        for w in self.qkv.weight.data.chunk(3):  # the paper's init for each of q, k, v on its own
            nn.init.xavier_uniform_(w)
        self.proj_out = conv1x1(channels, channels, scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, 3C)
        q, k, v = qkv[:, None].chunk(3, dim=-1)  # each (B, 1, HW, C): one head
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax(q k^T / sqrt(C)) v
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return self.proj_out(h).add_(x)


class Downsample(nn.Module):
    """Halve H, W: pad (0, 1, 0, 1) then 3x3 conv stride 2 as the paper, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)  # (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H, W: nearest-neighbour, then a 3x3 conv when with_conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = conv3x3(channels, channels) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return h if self.conv is None else self.conv(h)
