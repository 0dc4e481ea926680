"""Classifier-free guidance: the combination, the one batched forward, every sampler and parameterization."""

import pytest
import torch

from diffusion.core.gaussian import GaussianDiffusion
from diffusion.core.sampling import (
    SAMPLERS,
    GuidedModel,
    SamplerSpec,
    balanced_labels,
    class_rows,
    draw,
    guide,
    resolve_labels,
)
from diffusion.errors import UserError
from diffusion.nn import UNet
from helpers import ddpm, edm, flow, paper_betas, unet

T, K = 20, 3


def conditional_net(learned_variance: bool = False) -> UNet:
    """A tiny class-conditional U-Net whose every weight is random (the paper's zero-initialised layers too),
    so its output depends on the label."""
    torch.manual_seed(0)
    net = unet(in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               dropout=0.0, image_size=8, num_groups=4, num_classes=K, learned_variance=learned_variance)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


class Counting(torch.nn.Module):
    """The net, counting its forward calls and the batch sizes they take."""

    def __init__(self, net: UNet):
        super().__init__()
        self.net, self.num_classes, self.null_label, self.calls = net, net.num_classes, net.null_label, []

    def forward(self, x, t, y=None):
        self.calls.append(x.shape[0])
        return self.net(x, t, y)


def test_guide_is_exact_at_w0_and_w1_and_linear_between():
    gen = torch.Generator().manual_seed(0)
    out_u, out_c = torch.randn(4, 2, 8, 8, generator=gen), torch.randn(4, 2, 8, 8, generator=gen)
    assert torch.equal(guide(out_u, out_c, 0.0, 2), out_u)
    assert torch.equal(guide(out_u, out_c, 1.0, 2), out_c)
    for w in (0.5, 2.0, 7.5):  # ε̂ = ε_u + w (ε_c − ε_u), in float64
        expected = out_u.double() + w * (out_c.double() - out_u.double())
        torch.testing.assert_close(guide(out_u, out_c, w, 2).double(), expected, rtol=1e-6, atol=1e-6)
    # A learned variance (the second half of the channels) comes from the conditional pass, unguided.
    mixed = guide(out_u, out_c, 3.0, 1)
    assert torch.equal(mixed[:, 1:], out_c[:, 1:])
    torch.testing.assert_close(mixed[:, :1], out_u[:, :1] + 3 * (out_c[:, :1] - out_u[:, :1]))


@pytest.mark.parametrize("learned_variance", [False, True], ids=["fixed", "learned_variance"])
def test_batched_guided_forward_equals_two_separate_forwards(learned_variance):
    net = Counting(conditional_net(learned_variance))
    x, t, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 7, 12, 19]), torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        out = GuidedModel(net, y, 2.5)(x, t)
        assert net.calls == [10]  # one forward of the conditional and the unconditional batch together
        out_c, out_u = net(x, t, y), net(x, t, torch.full_like(y, K))
    assert not torch.allclose(out_c, out_u, atol=1e-3)  # the label matters to this net
    expected = out_u[:, :1] + 2.5 * (out_c[:, :1] - out_u[:, :1])
    if learned_variance:
        expected = torch.cat([expected, out_c[:, 1:]], 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_no_label_is_what_an_unlabelled_call_gets():
    net, x, t = conditional_net(), torch.randn(2, 1, 8, 8), torch.tensor([4, 9])
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, torch.tensor([K, K])))


OBJECTIVES = {"ddpm": lambda: ddpm(paper_betas(T)), "edm": edm, "flow": flow}


@pytest.mark.parametrize("objective_name, name", [
    *(("ddpm", name) for name in SAMPLERS),
    *((o, name) for o in ("edm", "flow") for name, kind in SAMPLERS.items() if not kind.markov_chain),
])
def test_w0_and_w1_sample_exactly_as_the_unconditional_and_conditional_models(objective_name, name):
    """For every objective and each sampler it takes (on the objective's default spacing for that sampler)."""
    net, diffusion = conditional_net(), OBJECTIVES[objective_name]()
    labels = torch.tensor([2, 0, 1, 2])
    spec = SamplerSpec(name, steps=None if name == "ddpm" else 5)
    cond = lambda x, t: net(x, t, labels)  # noqa: E731  (plain callables: no num_classes, so unguided)
    uncond = lambda x, t: net(x, t, torch.full_like(labels, K))  # noqa: E731
    kwargs = dict(shape=(1, 8, 8), seed=3, chunk_size=4)
    for w, reference in ((0.0, uncond), (1.0, cond)):
        guided = draw(net, diffusion, SamplerSpec(**{**spec.__dict__, "guidance_scale": w}), 4, labels=labels, **kwargs)
        assert torch.equal(guided.images, draw(reference, diffusion, spec, 4, **kwargs).images), (name, w)
        assert torch.equal(guided.labels, labels)
    strong = draw(net, diffusion, SamplerSpec(**{**spec.__dict__, "guidance_scale": 4.0}), 4, labels=labels, **kwargs)
    assert not torch.equal(strong.images, draw(cond, diffusion, spec, 4, **kwargs).images)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "mean"])
def test_guiding_the_output_is_guiding_eps_in_every_parameterization(parameterization):
    """x0, v and μ are affine in ε at a given x_t, so out_u + w (out_c − out_u) predicts ε_u + w (ε_c − ε_u)."""
    d = GaussianDiffusion(paper_betas(T), parameterization, "fixed_large", dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64), torch.arange(1, 19, 3)
    out_u, out_c = (torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))

    def eps_of(out):
        return d.predict_eps_from_x0(x_t, t, d.predict_x0(out, x_t, t))

    eps_u, eps_c = eps_of(out_u), eps_of(out_c)
    torch.testing.assert_close(eps_of(guide(out_u, out_c, 3.0, 1)), eps_u + 3.0 * (eps_c - eps_u),
                               rtol=1e-9, atol=1e-9)


def test_labels_balanced_by_index_by_name_and_their_errors():
    assert balanced_labels(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert set(torch.bincount(balanced_labels(64, 10)).tolist()) == {6, 7}  # the same count per class, ±1
    assert resolve_labels(None, 4, 2).tolist() == [0, 0, 1, 1]
    assert resolve_labels([3, 3, 7], 5, 10).tolist() == [3, 3, 7, 3, 3]
    assert resolve_labels(["dog", "cat"], 3, 2, ["cat", "dog"]).tolist() == [1, 0, 1]
    assert class_rows(64, 10)[1] == 6 and class_rows(64, 10)[0].tolist()[:7] == [0] * 6 + [1]
    assert resolve_labels(None, 4, None) is None
    for value, num_classes, fragment in (([10], 10, "outside the model's classes [0, 9]"),
                                         (["horse"], 2, "not a class of the model"),
                                         ([1], None, "the checkpoint is unconditional"),
                                         ([1, 2, 3], 2, "lists 3 labels for num_samples=2")):
        with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            resolve_labels(value, 2, num_classes, ["cat", "dog"] if num_classes == 2 else None)


def test_guiding_an_unconditional_net_is_an_error_before_sampling():
    torch.manual_seed(0)
    plain = unet(in_channels=1, out_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                 dropout=0.0, image_size=8, num_groups=4)
    calls = []
    plain.register_forward_hook(lambda *_: calls.append(1))
    diffusion = ddpm(paper_betas(T))
    with pytest.raises(UserError, match="guidance_scale=2 guides a class-conditional model"):
        draw(plain, diffusion, SamplerSpec("ddim", steps=3, guidance_scale=2.0), 2, shape=(1, 8, 8))
    with pytest.raises(UserError, match="labels were given for an unconditional model"):
        draw(plain, diffusion, SamplerSpec("ddim", steps=3), 2, shape=(1, 8, 8), labels=torch.tensor([0, 1]))
    with pytest.raises(UserError, match="guidance_scale must be a number in"):
        SamplerSpec("ddim", guidance_scale=-1.0).check()
    assert not calls
