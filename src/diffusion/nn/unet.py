"""The DDPM U-Net of Ho et al. 2020 (`diffusion_tf/models/unet.py`): (x_t, t[, y]) -> eps (and variance).

With `num_classes=K` it is class-conditional (Ho & Salimans 2022, classifier-free guidance): a learned
embedding of the label y in {0..K-1}, or of the extra "no label" class K, is added to the time embedding
before the nonlinearity every residual block sees. Without it (the default) nothing is added and the
network, its parameters and its outputs are exactly the unconditional ones.

Its shapes for each data set (the paper's CIFAR-10 and 256×256 nets, the small ones) are configs:
conf/model/*.yaml, written there only.

Module names follow the paper's code and its PyTorch port (`down[i].block[j]`, `mid.attn_1`,
`up[i].upsample`, ...) so that checkpoints map one to one; only q, k, v are fused into `attn.qkv`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.errors import UserError
from diffusion.nn.layers import (
    AttnBlock,
    Downsample,
    ResnetBlock,
    TimestepEmbedding,
    Upsample,
    conv3x3,
    group_norm,
)


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, attention after each when used, a resampler."""

    def __init__(self, block: list, attn: list, resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(block)
        self.attn = nn.ModuleList(attn)  # empty, or one AttnBlock per residual block
        if resample is not None:
            self.add_module(resample_name, resample)


class UNet(nn.Module):
    """The DDPM U-Net: x (B, C, H, W), t (B,) -> (B, out_channels * (2 if learned_variance else 1), H, W)."""

    def __init__(self, *, in_channels: int, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], dropout: float, image_size: int, num_groups: int,
                 resamp_with_conv: bool, channels_last: bool, num_classes: int | None,
                 learned_variance: bool = False):
        """Every argument is given (conf/model/*.yaml holds the shapes); num_classes=K makes the net class-conditional,
        None unconditional; learned_variance (the objective's) doubles the output channels. They are taken as given:
        config/validation.py checks them before anything is built (image_size divisible by the downsampling, ch a
        multiple of num_groups, attn_resolutions that occur)."""
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self.in_channels, self.image_size = in_channels, image_size
        self.num_res_blocks = num_res_blocks
        block_kw = dict(temb_ch=4 * ch, dropout=dropout, num_groups=num_groups)
        self.temb = TimestepEmbedding(ch, 4 * ch)
        self.num_classes = num_classes
        if num_classes is not None:  # row num_classes is "no label", what dropped labels and guidance use
            self.label_emb = nn.Embedding(num_classes + 1, 4 * ch)
        self.conv_in = conv3x3(in_channels, ch)
        self.down, skip_channels = self._build_down(ch, ch_mult, attn_resolutions, resamp_with_conv, block_kw)
        c = ch * ch_mult[-1]
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(c, c, **block_kw)
        self.mid.attn_1 = AttnBlock(c, num_groups)
        self.mid.block_2 = ResnetBlock(c, c, **block_kw)
        self.up = self._build_up(ch, ch_mult, attn_resolutions, resamp_with_conv, block_kw, skip_channels)
        self.norm_out = group_norm(ch, num_groups)
        self.conv_out = conv3x3(ch, out_channels * (2 if learned_variance else 1), scale=0.0)
        # NHWC: cuDNN (tensor cores) and oneDNN run the big convolutions faster (bench/unet_throughput.py),
        # but on a CPU, oneDNN's NHWC path is several times slower for small maps such as 8×8 digits.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network takes."""
        return self.in_channels, self.image_size, self.image_size

    def _build_down(self, ch, ch_mult, attn_resolutions, resamp_with_conv, block_kw):
        """Down path; also returns the channel count of every skip connection, in push order."""
        levels, skips, c, res = nn.ModuleList(), [ch], ch, self.image_size
        for i, mult in enumerate(ch_mult):
            block, attn = [], []
            for _ in range(self.num_res_blocks):
                block.append(ResnetBlock(c, ch * mult, **block_kw))
                c = ch * mult
                if res in attn_resolutions:
                    attn.append(AttnBlock(c, block_kw["num_groups"]))
                skips.append(c)
            last = i == len(ch_mult) - 1
            levels.append(Level(block, attn, None if last else Downsample(c, resamp_with_conv), "downsample"))
            if not last:
                skips.append(c)
                res //= 2
        return levels, skips

    def _build_up(self, ch, ch_mult, attn_resolutions, resamp_with_conv, block_kw, skip_channels):
        """Up path, stored in resolution order (up[0] is the full-resolution level) as the paper's port."""
        levels, skips = [], list(skip_channels)
        c, res = ch * ch_mult[-1], self.image_size // 2 ** (len(ch_mult) - 1)
        for i in reversed(range(len(ch_mult))):
            block, attn = [], []
            for _ in range(self.num_res_blocks + 1):
                block.append(ResnetBlock(c + skips.pop(), ch * ch_mult[i], **block_kw))
                c = ch * ch_mult[i]
                if res in attn_resolutions:
                    attn.append(AttnBlock(c, block_kw["num_groups"]))
            levels.insert(0, Level(block, attn, Upsample(c, resamp_with_conv) if i else None, "upsample"))
            res *= 2
        return nn.ModuleList(levels)

    @property
    def null_label(self) -> int | None:
        """The index of the "no label" class (num_classes), or None for an unconditional net."""
        return self.num_classes

    def _check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        """Raise a one-line UserError for inputs of the wrong shape."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise UserError(
                f"U-Net input has shape {tuple(x.shape)}, expected (B, {', '.join(map(str, expected))}); "
                f"resize the images or build the U-Net with matching in_channels/image_size"
            )
        if t.shape != (x.shape[0],):
            raise UserError(f"timesteps t have shape {tuple(t.shape)}, expected ({x.shape[0]},): one per image")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from x_t (B, C, H, W), timesteps t (B,) and, if conditional, labels y (B,) (None: "no
        label" for all) the (B, C_out, H, W) network output."""
        self._check_input(x, t)
        temb = self.temb(t)  # (B, 4ch)
        if self.num_classes is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes)
            temb = temb + self.label_emb(y)  # (B, 4ch): label embedding added to the time embedding
        elif y is not None:
            raise UserError("labels were given to an unconditional U-Net (model.num_classes is null); "
                            "train with model.num_classes=N to condition on labels")
        temb_act = F.silu(temb)  # (B, 4ch), shared by every residual block
        # Down path: every block output and every downsampled map is kept for a skip connection.
        hs = [self.conv_in(x.contiguous(memory_format=self.memory_format))]  # (B, ch, H, W)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb_act)
                hs.append(level.attn[j](h) if level.attn else h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))  # (B, C, H/2, W/2)
        # Middle: ResNet, attention, ResNet at the lowest resolution.
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb_act)), temb_act)
        # Up path: each block takes [h, skip] concatenated along channels.
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb_act)  # from (B, C + C_skip, H, W)
                h = level.attn[j](h) if level.attn else h
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (B, C, 2H, 2W)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)
        return h.contiguous()
