"""The DDPM U-Net: shapes, the paper's parameter counts, embedding, init, errors, and memory layouts."""

import math

import numpy as np
import pytest
import torch

from diffusion.config import validate
from diffusion.errors import UserError
from diffusion.formats.diffusers_unet import from_diffusers_state_dict, to_diffusers_state_dict
from diffusion.nn import UNet
from diffusion.nn.layers import timestep_embedding
from helpers import model_kwargs, train_cfg

SMALL = dict(in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
             image_size=16, num_groups=8, dropout=0.0, resamp_with_conv=True, channels_last=False,
             num_classes=None)  # fmt: skip


def perturbed(model: UNet, seed: int = 0) -> UNet:
    """The model with every parameter nudged, so the zero-initialised layers no longer hide anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs(model: UNet, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random images for the model and timesteps in [0, 1000)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=gen)
    return x, torch.randint(0, 1000, (batch,), generator=gen)


def count(*overrides: str) -> int:
    """Parameters of the network train.py builds for these overrides, on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(**model_kwargs(*overrides)).parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        SMALL,
        {**SMALL, "in_channels": 1, "out_channels": 1},
        {**SMALL, "ch_mult": (1, 2, 2), "attn_resolutions": (4, 16), "num_res_blocks": 2},
        {**SMALL, "resamp_with_conv": False, "attn_resolutions": ()},
        model_kwargs("data=digits"),
    ],
    ids=["small", "one-channel", "three-levels", "avgpool-noattn", "digits"],
)
def test_output_has_the_input_shape(kwargs):
    model = UNet(**kwargs)
    x, t = inputs(model, batch=3)
    assert model(x, t).shape == x.shape


def test_learned_variance_doubles_output_channels():
    model = UNet(**{**SMALL, "in_channels": 1, "out_channels": 1}, learned_variance=True)
    x, t = inputs(model)
    assert model(x, t).shape == (2, 2, 16, 16)


@pytest.mark.parametrize(
    ("overrides", "expected"),  # the counts of the paper's models in the public PyTorch port (pesser)
    [(["data=cifar10"], 35_746_307), (["experiment=cifar10_ddpm"], 35_746_307),
     (["experiment=celebahq_256"], 113_673_219), (["experiment=lsun_church_256"], 113_673_219),
     (["data=image_folder", "data.root=x"], 113_673_219)],
)
def test_paper_parameter_counts(overrides, expected):
    assert count(*overrides) == expected


def test_digits_config_is_small():
    assert 0.5e6 < count("data=digits") < 3e6


@pytest.mark.parametrize("dim", [4, 16, 128, 33])
def test_timestep_embedding_matches_the_papers_formula(dim):
    t = np.array([0, 1, 7, 250, 999])
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    expected = np.pad(expected, ((0, 0), (0, dim % 2)))
    got = timestep_embedding(torch.tensor(t), dim)
    assert got.dtype == torch.float32
    # float32 arguments up to 999 rad carry ~6e-5 absolute error into sin/cos.
    torch.testing.assert_close(got.double(), torch.from_numpy(expected), atol=2e-4, rtol=0)


def test_timestep_embedding_accepts_float_timesteps():
    torch.testing.assert_close(timestep_embedding(torch.tensor([3.0]), 8), timestep_embedding(torch.tensor([3]), 8))


def test_output_depends_on_the_timestep():
    model = perturbed(UNet(**SMALL))
    x, _ = inputs(model, batch=1)
    out = [model(x, torch.tensor([t])) for t in (0, 10, 500)]
    assert (out[0] - out[1]).abs().max() > 1e-3
    assert (out[1] - out[2]).abs().max() > 1e-3


def test_fresh_model_outputs_zero_as_the_papers_init():
    model = UNet(**SMALL).eval()
    x, t = inputs(model)
    assert torch.count_nonzero(model(x, t)) == 0


def test_init_follows_the_paper():
    model = UNet(**SMALL)
    block = model.down[0].block[0]
    for zero in (block.conv2.weight, model.mid.attn_1.proj_out.weight, model.conv_out.weight):
        assert torch.count_nonzero(zero) == 0
    assert all(torch.count_nonzero(b) == 0 for n, b in model.named_parameters() if n.endswith("bias"))
    w = model.mid.block_1.conv1.weight.detach()  # 32 -> 32 channels, 3x3: fan_in = fan_out = 288
    bound = math.sqrt(6 / (288 + 288))  # xavier uniform = variance_scaling(1, fan_avg, uniform)
    assert w.abs().max() <= bound and w.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for w in model.mid.attn_1.qkv.weight.detach().chunk(3):  # q, k and v each initialised as a 32x32 dense
        assert w.abs().max() <= math.sqrt(6 / 64) and w.abs().max() > 0.9 * math.sqrt(6 / 64)


def test_channels_last_input_gives_the_same_output():
    model = perturbed(UNet(**SMALL))
    x, t = inputs(model)
    out = model(x, t)
    out_cl = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=1e-5)
    nhwc = UNet(**{**SMALL, "channels_last": True})
    nhwc.load_state_dict(model.state_dict())
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(x, t), out, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    model = perturbed(UNet(**{**SMALL, "dropout": 0.1})).train()
    x, t = inputs(model)
    model(x, t).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_holds_no_buffers_and_nothing_about_schedules():
    model = UNet(**SMALL)
    assert list(model.buffers()) == []
    for name, _ in model.named_parameters():
        assert not any(word in name for word in ("beta", "alpha", "sigma", "schedule", "posterior")), name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.image_size=30", "model.image_size=30 is not divisible by the U-Net's total downsampling 8"),
        ("model.ch=48", "model.ch=48 is not a multiple of model.num_groups=32"),
        ("model.attn_resolutions=[12]",
         r"model.attn_resolutions=\[12\] holds 12, which never occurs .* \[32, 16, 8, 4\]"),
    ],
)
def test_bad_construction_is_a_one_line_error_before_building(override, message, tmp_path):
    """The U-Net takes its arguments as given: the config's validation names the bad model.* setting first."""
    with pytest.raises(UserError, match=message) as err:
        validate(train_cfg(tmp_path, "data=cifar10", override))  # conf/model/cifar10.yaml: Ho et al.'s net
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_argument_but_learned_variance_is_required(name):
    """The shapes live in conf/model/*.yaml alone: leaving any argument out is an error, not a silent default."""
    with pytest.raises(TypeError, match=name):
        UNet(**{k: v for k, v in SMALL.items() if k != name})
    assert UNet(**SMALL).conv_out.out_channels == 3  # learned_variance defaults to False: C output channels


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 16, 16), (3, 16, 16)])
def test_wrong_input_shape_raises_one_line_error(shape):
    model = UNet(**SMALL)
    with pytest.raises(UserError, match=r"U-Net input has shape .* expected \(B, 3, 16, 16\)"):
        model(torch.zeros(shape), torch.zeros(2, dtype=torch.long))


def test_wrong_timestep_shape_raises():
    model = UNet(**SMALL)
    with pytest.raises(UserError, match=r"timesteps t have shape \(1,\), expected \(2,\)"):
        model(torch.zeros(2, 3, 16, 16), torch.zeros(1, dtype=torch.long))


def test_same_function_as_diffusers_port_of_the_paper():
    """With the same weights, diffusers' UNet2DModel configured as google/ddpm-cifar10-32 agrees."""
    import diffusers  # a dev dependency: the comparison always runs in `make test`

    kwargs = {**SMALL, "ch_mult": (1, 2, 2), "num_res_blocks": 2}
    ours = perturbed(UNet(**kwargs)).double()
    theirs = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    ).double().eval()  # fmt: skip
    # Both embed t in float32 with the same formula but a different order of operations; share ours so the
    # comparison is of the network alone (the embedding has its own test above).
    theirs.time_proj.forward = lambda t: timestep_embedding(t, 16)
    state = to_diffusers_state_dict(ours.state_dict(), len(ours.down))
    assert state.keys() == theirs.state_dict().keys()
    theirs.load_state_dict(state)  # shapes too: the attention's 1x1 convs become Linear matrices
    back = from_diffusers_state_dict(theirs.state_dict(), kwargs, learned_variance=False)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    x, t = inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x.double(), t), theirs(x.double(), t).sample, atol=1e-10, rtol=1e-10)
