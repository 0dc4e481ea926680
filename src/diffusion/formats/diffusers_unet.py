"""Hugging Face diffusers' UNet2DModel <-> our U-Net: config.json fields and weight names, both directions.

Only the layout of Ho et al. 2020 maps: DownBlock2D/AttnDownBlock2D down, the mirrored UpBlock2D/AttnUpBlock2D up,
the ResNet-attention-ResNet middle, the paper's sinusoidal time embedding (no flip, frequency shift 1), single-head
attention, GroupNorm eps 1e-6 and the paper's asymmetric downsampling padding. Anything else is refused with a
one-line UserError naming the field. A missing field takes diffusers 0.42's default, as diffusers itself does.
"""

import inspect
import re
from pathlib import Path

import torch
from torch import Tensor

from diffusion.errors import UserError
from diffusion.nn import UNet
from diffusion.nn.layers import GROUPNORM_EPS

DIFFUSERS_VERSION = "0.42.1"  # the version these defaults and the tests are checked against
UNET_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)  # fmt: skip
# (diffusers value required, why) for every UNet2DModel field our U-Net has no counterpart of.
UNET_FIXED = {
    "center_input_sample": (False, "our U-Net takes x_t in [-1, 1] as is"),
    "time_embedding_type": ("positional", "our U-Net has the paper's sinusoidal embedding only"),
    "time_embedding_dim": (None, "our time embedding has 4*block_out_channels[0] channels"),
    "flip_sin_to_cos": (False, "the paper's embedding is [sin, cos]"),
    "freq_shift": (1, "the paper's frequencies are 10000^(-i/(d/2-1))"),
    "mid_block_type": ("UNetMidBlock2D", "our U-Net has the paper's ResNet-attention-ResNet middle"),
    "mid_block_scale_factor": (1, "our residual blocks do not rescale their output"),
    "downsample_padding": (0, "the paper's downsampling pads right and bottom by one"),
    "downsample_type": ("conv", "our U-Net downsamples with a strided conv"),
    "upsample_type": ("conv", "our U-Net upsamples with nearest neighbours and a conv"),
    "norm_eps": (GROUPNORM_EPS, "our GroupNorm has the paper's eps 1e-6"),
    "resnet_time_scale_shift": ("default", "our residual blocks add the time embedding"),
    "add_attention": (True, "our middle block has attention"),
    "class_embed_type": (None, "our U-Net is unconditional"),
    "num_class_embeds": (None, "our U-Net is unconditional"),
}


def refuse(file: Path | str, field: str, value, why: str) -> UserError:
    """The one-line error for a field we cannot represent."""
    return UserError(f"{file}: {field}={value!r} is not supported: {why}")


# --- weights: our names <-> diffusers' UNet2DModel names --------------------------------------------------
_RENAMES = [("temb.dense.0", "time_embedding.linear_1"), ("temb.dense.1", "time_embedding.linear_2"),
            ("norm_out", "conv_norm_out"), ("mid.block_1", "mid_block.resnets.0"),
            ("mid.block_2", "mid_block.resnets.1"), ("mid.attn_1", "mid_block.attentions.0"),
            (".block.", ".resnets."), (".attn.", ".attentions."), ("temb_proj", "time_emb_proj"),
            ("nin_shortcut", "conv_shortcut"), ("downsample.conv", "downsamplers.0.conv"),
            ("upsample.conv", "upsamplers.0.conv"), (".norm.", ".group_norm."), ("proj_out", "to_out.0")]  # fmt: skip
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.15


def diffusers_names(name: str, num_levels: int) -> list[str]:
    """The diffusers name(s) of one of our U-Net's weights: three (to_q, to_k, to_v) for a fused qkv."""
    parts = name.split(".")
    if parts[0] in ("down", "up"):  # diffusers lists the up blocks from the lowest resolution
        i = int(parts[1]) if parts[0] == "down" else num_levels - 1 - int(parts[1])
        name = ".".join([f"{parts[0]}_blocks", str(i), *parts[2:]])
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return [name.replace("qkv", p) for p in ("to_q", "to_k", "to_v")] if ".qkv." in name else [name]


def _reference_state_dict(unet_kwargs: dict, learned_variance: bool) -> dict[str, Tensor]:
    """The state dict of our U-Net with these arguments, on the meta device (no memory, no init cost)."""
    kwargs = {k: v for k, v in unet_kwargs.items() if k != "learned_variance"}
    with torch.device("meta"):
        return UNet(**kwargs, learned_variance=learned_variance).state_dict()


def check_state_dict(state_dict: dict[str, Tensor], unet_kwargs: dict, learned_variance: bool) -> None:
    """Refuse a state dict whose names or shapes are not those of our U-Net with these arguments."""
    reference = _reference_state_dict(unet_kwargs, learned_variance)
    for name in sorted(set(reference) | set(state_dict)):
        if name not in state_dict or name not in reference:
            raise UserError(f"weight {name!r} is {'missing' if name in reference else 'unexpected'} for the U-Net of "
                            f"these arguments; pass the U-Net's own state_dict (no 'net.' prefix)")
        if state_dict[name].shape != reference[name].shape:
            raise UserError(f"weight {name!r} has shape {tuple(state_dict[name].shape)}, the U-Net of these "
                            f"arguments has {tuple(reference[name].shape)}; pass the matching unet_kwargs")


def to_diffusers_state_dict(state_dict: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Our U-Net's weights under UNet2DModel's names: q/k/v split, attention 1x1 convs as Linear matrices."""
    out = {}
    for name, value in state_dict.items():
        targets = diffusers_names(name, num_levels)
        for target, chunk in zip(targets, value.chunk(len(targets)), strict=True):
            is_linear = ".attentions." in target and target.endswith("weight") and chunk.ndim == 4
            out[target] = chunk.flatten(1) if is_linear else chunk
    return out


def from_diffusers_state_dict(state: dict[str, Tensor], unet_kwargs: dict, learned_variance: bool,
                              file: Path | str = "state_dict") -> dict[str, Tensor]:
    """UNet2DModel weights (current or pre-0.15 attention names) as our U-Net's state dict; refuses any mismatch."""
    state = {re.sub(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.",
                    lambda m: m[1] + _LEGACY_ATTENTION[m[2]] + ".", k): v for k, v in state.items()}  # fmt: skip
    reference = _reference_state_dict(unet_kwargs, learned_variance)
    out, used = {}, set()
    for name, ref in reference.items():
        sources = diffusers_names(name, len(unet_kwargs["ch_mult"]))
        missing = [s for s in sources if s not in state]
        if missing:
            raise UserError(f"{file}: weight {missing[0]!r} is missing; the weights do not match config.json")
        value = torch.cat([state[s] for s in sources]) if len(sources) > 1 else state[sources[0]]
        if value.shape != ref.shape and not (value.ndim == 2 and ref.shape == (*value.shape, 1, 1)):
            raise UserError(f"{file}: weight {sources[0]!r} has shape {tuple(value.shape)}, config.json implies "
                            f"{tuple(ref.shape)}; the weights do not match config.json")
        out[name] = value.reshape(ref.shape)
        used.update(sources)
    extra = sorted(set(state) - used)
    if extra:
        raise UserError(f"{file}: weight {extra[0]!r} (and {len(extra) - 1} more) has no place in our U-Net")
    return out


# --- UNet2DModel config <-> our U-Net's keyword arguments -------------------------------------------------
def _check_unet_fields(cfg: dict, file: Path) -> None:
    """Refuse every UNet2DModel field that has no counterpart in our U-Net."""
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        raise refuse(file, unknown[0], cfg[unknown[0]], f"unknown to this reader (diffusers {DIFFUSERS_VERSION})")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise refuse(file, "_class_name", cfg["_class_name"], "only UNet2DModel maps to our U-Net")
    c = {**UNET_DEFAULTS, **cfg}
    if c["time_embedding_dim"] == 4 * c["block_out_channels"][0]:  # diffusers' default, written out
        c["time_embedding_dim"] = None
    for field, (value, why) in UNET_FIXED.items():
        if c[field] != value:
            raise refuse(file, field, c[field], f"{why}; it must be {value!r}")
    if c["act_fn"] not in ("silu", "swish"):
        raise refuse(file, "act_fn", c["act_fn"], "our U-Net uses SiLU; it must be 'silu'")
    if not isinstance(c["norm_num_groups"], int):
        raise refuse(file, "norm_num_groups", c["norm_num_groups"], "our GroupNorms need a number of groups")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        raise refuse(file, "attn_norm_num_groups", c["attn_norm_num_groups"],
                     "our GroupNorms all have norm_num_groups groups; it must be null")


def unet_kwargs_from_config(cfg: dict, file: Path | str = "config.json") -> tuple[dict, bool]:
    """Our U-Net's keyword arguments and learned_variance from a UNet2DModel config.json; refuses the rest."""
    _check_unet_fields(cfg, file)
    c = {**UNET_DEFAULTS, **cfg}
    channels, down, up = list(c["block_out_channels"]), list(c["down_block_types"]), list(c["up_block_types"])
    if any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down):
        raise refuse(file, "down_block_types", down, "only DownBlock2D and AttnDownBlock2D are the paper's")
    if any(t not in ("UpBlock2D", "AttnUpBlock2D") for t in up) or len(up) != len(down):
        raise refuse(file, "up_block_types", up, "only UpBlock2D and AttnUpBlock2D, one per down block")
    attn = [t == "AttnDownBlock2D" for t in down]
    if attn != [t == "AttnUpBlock2D" for t in reversed(up)]:
        raise refuse(file, "up_block_types", up, f"the paper has attention in the up block of each resolution "
                     f"whose down block has it (down_block_types={down})")
    ch = channels[0]
    if len(channels) != len(down) or any(c_i % ch for c_i in channels):
        raise refuse(file, "block_out_channels", channels, "each must be a multiple of the first, one per block")
    heads_dim = c["attention_head_dim"]
    attn_channels = {channels[-1]} | {c_i for c_i, a in zip(channels, attn, strict=True) if a}
    if heads_dim is not None and attn_channels != {heads_dim}:
        raise refuse(file, "attention_head_dim", heads_dim, f"our attention has one head over all channels "
                     f"({sorted(attn_channels)}); it must be null")
    size = c["sample_size"]
    size = size if isinstance(size, (list, tuple)) else [size, size]
    if size[0] is None or size[0] != size[1]:
        raise refuse(file, "sample_size", c["sample_size"], "our U-Net needs a square image size")
    if size[0] % 2 ** (len(channels) - 1):
        raise refuse(file, "sample_size", c["sample_size"], f"it must be divisible by the {2 ** (len(channels) - 1)} "
                     f"its {len(channels)} blocks downsample by")
    if ch % c["norm_num_groups"]:
        raise refuse(file, "norm_num_groups", c["norm_num_groups"], f"GroupNorm needs whole groups of "
                     f"block_out_channels[0]={ch}")
    in_ch, out_ch = c["in_channels"], c["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise refuse(file, "out_channels", out_ch, f"it must be in_channels={in_ch} or twice that (learned variance)")
    kwargs = dict(
        in_channels=in_ch, out_channels=in_ch, ch=ch, ch_mult=tuple(c_i // ch for c_i in channels),
        num_res_blocks=c["layers_per_block"], attn_resolutions=tuple(size[0] // 2**i for i, a in enumerate(attn) if a),
        dropout=float(c["dropout"]), image_size=size[0], num_groups=c["norm_num_groups"], resamp_with_conv=True,
        channels_last=False, num_classes=None,  # diffusers' UNet2DModel: NCHW, unconditional (class embeddings refused)
    )  # fmt: skip
    return kwargs, out_ch == 2 * in_ch


def unet_config_from_kwargs(unet_kwargs: dict, learned_variance: bool) -> dict:
    """The UNet2DModel config.json of our U-Net (refuses what diffusers' blocks cannot build)."""
    known = set(inspect.signature(UNet).parameters) - {"self"}
    unknown = sorted(set(unet_kwargs) - known)
    if unknown:
        raise UserError(f"U-Net argument {unknown[0]!r} is unknown; use the keys of diffusion.nn.UNet")
    k = {"num_classes": None, **unet_kwargs}  # a net saved before labels existed is unconditional
    if unet_kwargs.get("learned_variance", learned_variance) != learned_variance:
        raise UserError(f"net.learned_variance={k['learned_variance']} contradicts the variance; drop it from net")
    if k["num_classes"] is not None:
        raise UserError(f"a class-conditional U-Net (num_classes={k['num_classes']}) cannot be exported: "
                        "DDPMPipeline draws unconditional samples; sample it with sample.py instead")
    if not k["resamp_with_conv"]:
        raise UserError("resamp_with_conv=False cannot be exported: diffusers' blocks always resample with a conv")
    if k["ch_mult"][0] != 1:
        raise UserError(f"ch_mult={list(k['ch_mult'])} cannot be exported: diffusers' first level has ch channels "
                        f"(ch_mult[0] must be 1)")
    if k["out_channels"] != k["in_channels"]:
        raise UserError(f"out_channels={k['out_channels']} != in_channels={k['in_channels']} cannot be exported: "
                        f"DDPMPipeline needs the prediction to have the image's shape")
    attn = [k["image_size"] // 2**i in tuple(k["attn_resolutions"]) for i in range(len(k["ch_mult"]))]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    return {
        **UNET_DEFAULTS,
        **{field: value for field, (value, _) in UNET_FIXED.items()},
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": k["image_size"],
        "in_channels": k["in_channels"], "out_channels": k["out_channels"] * (2 if learned_variance else 1),
        "down_block_types": down, "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        "block_out_channels": [k["ch"] * m for m in k["ch_mult"]], "layers_per_block": k["num_res_blocks"],
        "dropout": k["dropout"], "act_fn": "silu", "attention_head_dim": None, "norm_num_groups": k["num_groups"],
    }  # fmt: skip
