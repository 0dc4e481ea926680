"""The sampler spec (one schema, defaults in one place, every mistake one line) and `draw` (per-image noise)."""

import pytest
import torch

from diffusion.core.objectives.ddpm import DDPM
from diffusion.core.sampling import (
    SamplerSpec,
    as_sampler_spec,
    check_index,
    chunk_bounds,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    dpmpp_2m_sde_sample,
    draw,
    draw_chunk,
    heun_sample,
    sampler_spec,
    unipc_sample,
)
from diffusion.core.schedules import linear_beta_schedule, space_timesteps
from diffusion.errors import UserError
from helpers import ddpm, edm, flow, paper_betas

T = 30
FAST = ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "heun"]


def diffusion() -> DDPM:
    """The DDPM objective of T=30 large steps (float32 buffers, as draw samples in float32)."""
    return ddpm(linear_beta_schedule(T, 1e-3, 0.2))


def of_T(num_timesteps: int) -> DDPM:
    """A DDPM objective of T steps (the paper's betas): what the spec's limits are checked against."""
    return ddpm(paper_betas(num_timesteps))


T1000 = of_T(1000)


class DropoutNet(torch.nn.Module):
    """A tiny ε-model with dropout: in training mode two calls differ, in eval mode they agree."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, t):
        return self.drop(self.conv(x)) * (1 + t.float().reshape(-1, 1, 1, 1) / T)


@pytest.fixture
def net() -> DropoutNet:
    torch.manual_seed(0)
    return DropoutNet()


# --- the spec -------------------------------------------------------------------------------------------
def test_defaults_are_filled_once_and_capped_at_T():
    assert SamplerSpec().resolved(T1000) == SamplerSpec("ddpm")
    assert SamplerSpec("ddim").resolved(T1000) == SamplerSpec("ddim", steps=50, eta=0.0, spacing="linspace")
    assert SamplerSpec("respaced").resolved(T1000) == SamplerSpec("respaced", steps=50, spacing="linspace")
    assert SamplerSpec("ddim").resolved(of_T(20)).steps == 20  # the default never exceeds a short schedule's T
    assert SamplerSpec("ddim", steps=7, eta=0.5).resolved(of_T(20)) == SamplerSpec("ddim", 7, 0.5, "linspace")


def test_a_null_name_is_the_objectives_own_sampler_on_its_own_spacing():
    """DDPM: ddpm (Algorithm 2); EDM: heun on Karras et al.'s levels, whatever the sampler; flow: euler from t = 1."""
    assert SamplerSpec().resolved(T1000) == SamplerSpec("ddpm")
    assert SamplerSpec().resolved(edm()) == SamplerSpec("heun", steps=20, spacing="karras")
    assert SamplerSpec().resolved(flow()) == SamplerSpec("euler", steps=50, spacing="linspace")
    assert SamplerSpec().check_for(edm()) == SamplerSpec("heun", steps=20, spacing="karras")
    assert SamplerSpec("dpmpp_2m").resolved(edm()).spacing == "karras"
    assert SamplerSpec("dpmpp_2m").resolved(flow()).spacing == "logsnr"  # the sampler's own, which flow has
    assert SamplerSpec().label(edm()) == "heun-20" and SamplerSpec().nfe(edm()) == 19
    assert SamplerSpec().describe(flow())["name"] == "euler" and SamplerSpec().tag(flow()) == "euler-50"
    # a continuous objective has no T: no step count is too many
    assert SamplerSpec("heun", steps=5000).check_for(edm()).steps == 5000
    assert SamplerSpec("heun").most_steps(edm()) is None and SamplerSpec("heun").most_steps(T1000) == 2000


def test_a_null_names_settings_are_checked_against_the_objectives_own_sampler():
    cases = [
        (SamplerSpec(steps=5), T1000, "sampler.steps=5 is not used by sampler.name=ddpm"),
        (SamplerSpec(eta=0.5), edm(), "sampler.eta=0.5 is not used by sampler.name=heun"),
        (SamplerSpec(order=2), flow(), "sampler.order=2 is not used by sampler.name=euler"),
        (SamplerSpec("ddim", spacing="trailing"), edm(), "sampler.spacing=trailing is not a spacing of "
                                                         "objective=edm; choose one of ['karras', 'logsnr', "
                                                         "'linspace']"),
        (SamplerSpec("euler", spacing="leading"), flow(), "spacing=leading is not a spacing of objective=flow"),
    ]
    for spec, objective, fragment in cases:
        with pytest.raises(UserError) as err:
            spec.check_for(objective)
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_describe_is_what_protocols_recorded_before_the_spec():
    """Protocol ids of earlier scores stay valid: the same dict as the hand-written one of the quality code."""
    assert SamplerSpec("ddim", steps=50).describe(T1000) == {
        "name": "ddim", "steps": 50, "eta": 0.0, "spacing": "linspace", "clip_denoised": True}
    assert SamplerSpec("ddpm").describe(T1000) == {
        "name": "ddpm", "steps": 1000, "eta": None, "spacing": None, "clip_denoised": True}
    assert SamplerSpec("respaced", steps=100).describe(T1000)["eta"] is None
    assert SamplerSpec("ddim", steps=50).label(T1000) == "ddim-50 η=0"
    assert SamplerSpec("ddpm").label(T1000) == "ddpm-1000"


@pytest.mark.parametrize("spec, fragments", [
    (SamplerSpec("ddmi"), ["callbacks.quality.sampler.name=ddmi is not a sampler", "did you mean "
                           "callbacks.quality.sampler.name=ddim?", "['ddpm', 'ddim', 'euler', 'respaced', "
                           "'dpmpp_2m', 'dpmpp_2m_sde', 'unipc', 'heun', 'ipndm', 'deis', 'deis_logrho', "
                           "'consistency']"]),
    (SamplerSpec("ddpm", steps=5), ["callbacks.quality.sampler.steps=5 is not used by callbacks.quality.sampler."
                                    "name=ddpm", "callbacks.quality.sampler.name=respaced "
                                    "callbacks.quality.sampler.steps=5"]),
    (SamplerSpec("ddpm", spacing="trailing"), ["spacing=trailing is not used by", "name=respaced"]),
    (SamplerSpec("ddpm", eta=0.7), ["eta=0.7 is not used by", "callbacks.quality.sampler.name=ddim "
                                    "callbacks.quality.sampler.eta=0.7"]),
    (SamplerSpec("respaced", eta=0.5), ["eta=0.5 is not used by callbacks.quality.sampler.name=respaced",
                                        "name=ddim"]),
    (SamplerSpec("ddim", steps=0), ["callbacks.quality.sampler.steps must be an integer >= 1, got 0"]),
    (SamplerSpec("ddim", eta=1.5), ["callbacks.quality.sampler.eta must be in [0, 1], got 1.5"]),
    (SamplerSpec("ddim", spacing="uniform"), ["spacing=uniform is not a spacing",
                                              "['linspace', 'leading', 'trailing', 'logsnr', 'karras']"]),
    # the fast samplers: eta, order, spacings and steps they take, in one line naming the sampler that takes them
    (SamplerSpec("dpmpp_2m", eta=0.5), ["eta=0.5 is not used by callbacks.quality.sampler.name=dpmpp_2m",
                                        "name=ddim callbacks.quality.sampler.eta=0.5", "'dpmpp_2m_sde'"]),
    (SamplerSpec("dpmpp_2m_sde", eta=-0.5), ["callbacks.quality.sampler.eta must be >= 0, got -0.5",
                                             "0 its ODE"]),
    (SamplerSpec("ddim", order=2), ["callbacks.quality.sampler.order=2 is not used by callbacks.quality.sampler."
                                    "name=ddim", "use callbacks.quality.sampler.name=unipc "
                                    "callbacks.quality.sampler.order=2"]),
    (SamplerSpec("unipc", order=4), ["callbacks.quality.sampler.order must be one of [1, 2, 3], got 4"]),
    (SamplerSpec("unipc", steps=4, order=3), ["callbacks.quality.sampler.order=3 needs callbacks.quality.sampler."
                                              "steps >= 5", "got 4 steps; use callbacks.quality.sampler.order=2 "
                                              "or callbacks.quality.sampler.steps=5"]),
    (SamplerSpec("dpmpp_2m", spacing="leading"), ["spacing=leading is not a spacing of callbacks.quality.sampler."
                                                  "name=dpmpp_2m", "never reach index T-1",
                                                  "['linspace', 'trailing', 'logsnr', 'karras']"]),
    (SamplerSpec("heun", spacing="sigma"), ["spacing=sigma is not a spacing;"]),
])
def test_every_mistake_is_one_line_naming_the_key(spec, fragments):
    with pytest.raises(UserError) as err:
        spec.check("callbacks.quality.sampler")
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_the_fast_samplers_defaults_are_filled_once_and_adapt_to_T():
    assert SamplerSpec("dpmpp_2m").resolved(T1000) == SamplerSpec("dpmpp_2m", steps=20, spacing="logsnr")
    assert SamplerSpec("dpmpp_2m_sde").resolved(T1000) == SamplerSpec("dpmpp_2m_sde", steps=20, eta=1.0,
                                                                      spacing="logsnr")
    assert SamplerSpec("unipc").resolved(T1000) == SamplerSpec("unipc", steps=20, spacing="logsnr", order=3)
    assert SamplerSpec("heun").resolved(T1000) == SamplerSpec("heun", steps=20, spacing="karras")
    # default steps capped at what T allows (heun: 2T, N <= T points), a default order at what the steps allow
    assert SamplerSpec("dpmpp_2m").resolved(of_T(8)).steps == 8
    assert SamplerSpec("heun").resolved(of_T(8)).steps == 16
    assert [SamplerSpec("unipc", steps=n).resolved(T1000).order for n in (1, 2, 3, 4, 5, 9)] == [1, 1, 2, 2, 3, 3]
    assert SamplerSpec("unipc").resolved(of_T(4)) == SamplerSpec("unipc", steps=4, spacing="logsnr", order=2)


def test_describe_adds_order_for_unipc_only_and_labels_say_it():
    assert SamplerSpec("unipc", steps=10).describe(T1000) == {
        "name": "unipc", "steps": 10, "eta": None, "spacing": "logsnr", "clip_denoised": True, "order": 3}
    assert SamplerSpec("dpmpp_2m_sde", steps=5).describe(T1000) == {
        "name": "dpmpp_2m_sde", "steps": 5, "eta": 1.0, "spacing": "logsnr", "clip_denoised": True}
    assert [SamplerSpec(n, steps=10).label(T1000) for n in FAST] == [
        "dpmpp_2m-10", "dpmpp_2m_sde-10 η=1", "unipc-10 order=3", "heun-10"]
    # a spacing away from the sampler's default is named (the tables' rows differ), the default is not
    assert SamplerSpec("dpmpp_2m", steps=10, spacing="karras").label(T1000) == "dpmpp_2m-10 karras"
    assert SamplerSpec("dpmpp_2m", steps=10, spacing="logsnr").label(T1000) == "dpmpp_2m-10"
    assert SamplerSpec("ddim", steps=50, spacing="trailing").label(T1000) == "ddim-50 η=0 trailing"


def test_tags_name_the_sampler_its_steps_and_what_was_set_away_from_the_defaults():
    assert SamplerSpec("dpmpp_2m", steps=10).tag(T1000) == "dpmpp_2m-10"
    assert SamplerSpec("unipc").tag(T1000) == SamplerSpec("unipc", steps=20, order=3).tag(T1000) == "unipc-20"
    assert SamplerSpec("unipc", steps=20, order=2).tag(T1000) == "unipc-20-order2"
    assert SamplerSpec("ddim", steps=10, eta=0.5, spacing="karras", clip_denoised=False).tag(T1000) == \
        "ddim-10-eta0.5-karras-noclip"
    assert SamplerSpec("ddpm").tag(T1000) == "ddpm-1000"


def test_steps_above_T_are_refused_once_T_is_known():
    with pytest.raises(UserError, match=r"sampler.steps=40 exceeds the model's T=30 steps; use sampler.steps=30"):
        SamplerSpec("ddim", steps=40).check_for(diffusion())


def test_heun_takes_up_to_2T_steps_and_an_order_is_checked_against_the_steps_T_allows():
    assert SamplerSpec("heun", steps=60).check_for(diffusion()).nfe(diffusion()) == 59  # N = 30 points: 2N - 1
    with pytest.raises(UserError, match=r"sampler.steps=61 exceeds what the model's T=30 steps allow sampler.name="
                                        r"heun .*; use sampler.steps=20 or at most 60"):
        SamplerSpec("heun", steps=61).check_for(diffusion())
    with pytest.raises(UserError, match=r"sampler.order=3 needs sampler.steps >= 5 .* got 4 steps; use "
                                        r"sampler.order=2"):
        SamplerSpec("unipc", order=3).check_for(of_T(4))  # the default steps, 20, capped at T=4


@pytest.mark.parametrize("objective, spec, fragment", [
    (diffusion(), SamplerSpec("respaced", steps=31), "sampler.steps=31 exceeds the model's T=30"),
    (of_T(4), SamplerSpec("unipc", order=3), "sampler.order=3 needs sampler.steps >= 5"),
    (flow(), SamplerSpec("ddpm"), "sampler.name=ddpm walks DDPM's Markov chain"),
    (edm(), SamplerSpec("respaced", steps=5), "sampler.name=respaced walks DDPM's Markov chain"),
], ids=["steps-above-T", "order-above-steps", "ddpm-on-flow", "respaced-on-edm"])
def test_check_for_refuses_what_the_objective_cannot_run(objective, spec, fragment):
    """The second half of a spec's validation (every command runs it once the objective is known; draw() then
    trusts the spec): one line each."""
    with pytest.raises(UserError) as err:
        spec.check().check_for(objective)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_as_sampler_spec_takes_mappings_and_names_unknown_fields():
    assert sampler_spec({"name": "ddmi", "steps": 0}) == SamplerSpec("ddmi", steps=0)  # converted, not checked
    assert sampler_spec(None) == SamplerSpec() and sampler_spec(None, SamplerSpec("heun")) == SamplerSpec("heun")
    assert as_sampler_spec({"name": "ddim", "steps": 5}) == SamplerSpec("ddim", steps=5)
    assert as_sampler_spec(None, default=SamplerSpec("ddim")) == SamplerSpec("ddim")
    with pytest.raises(UserError, match="callbacks.samples.sampler.step is not a sampler setting"):
        as_sampler_spec({"name": "ddim", "step": 5}, "callbacks.samples.sampler")
    with pytest.raises(UserError, match="sampler must be a group of settings, got 'ddim'; write sampler.name=ddim"):
        as_sampler_spec("ddim")


# --- drawing N images -----------------------------------------------------------------------------------
def test_a_chunk_that_is_one_noise_block_starts_from_a_generator_seeded_seed_plus_k(net):
    """Recomputed by hand: with chunks of one noise block, chunk k's x_T and its noise come from
    torch.Generator().manual_seed(seed + k), all of its images' rows (what every draw was before image seeds)."""
    d, spec = diffusion(), SamplerSpec("ddim", steps=6, eta=0.5)
    drawn = draw(net, d, spec, 10, shape=(1, 4, 4), seed=7, chunk_size=4, noise_block=4)
    assert drawn.index.tolist() == list(range(10)) and drawn.images.shape == (10, 1, 4, 4)
    net.eval()
    for k, start, stop in [(0, 0, 4), (1, 4, 8), (2, 8, 10)]:
        gen = torch.Generator().manual_seed(7 + k)
        x_T = torch.randn(4, 1, 4, 4, generator=gen)  # a whole block, the last one's rows 2 and 3 unused
        with torch.no_grad():
            expected = ddim_sample(d.denoiser(net, clip=True), x_T, num_steps=6, eta=0.5, generator=gen).x0.clamp(-1, 1)
        torch.testing.assert_close(drawn.images[start:stop], expected[:stop - start], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_image_i_is_the_same_whatever_the_chunk_size_device_count_or_other_images(name, net):
    """Image i comes from row i mod B of draws seeded seed + i // B: any chunk size, any rank count, and any subset
    of the image numbers give the same images (the network is run on other batches: to float tolerance)."""
    d = diffusion()
    spec = SamplerSpec(name, steps=6, eta=1.0) if name == "ddim" else SamplerSpec(name)
    one = draw(net, d, spec, 10, shape=(1, 4, 4), seed=5, chunk_size=10, noise_block=4).images
    for chunk_size, world in [(1, 1), (3, 1), (4, 2), (7, 3), (250, 1)]:
        parts = [draw(net, d, spec, 10, shape=(1, 4, 4), seed=5, chunk_size=chunk_size, noise_block=4, rank=r,
                      world_size=world) for r in range(world)]
        images = torch.cat([p.images for p in parts])[torch.cat([p.index for p in parts]).argsort()]
        torch.testing.assert_close(images, one, rtol=0, atol=1e-6)
    some = draw(net, d, spec, 10, shape=(1, 4, 4), seed=5, chunk_size=3, noise_block=4, index=[9, 2, 5, 6])
    assert some.index.tolist() == [2, 5, 6, 9]
    torch.testing.assert_close(some.images, one[[2, 5, 6, 9]], rtol=0, atol=1e-6)
    other = draw(net, d, spec, 10, shape=(1, 4, 4), seed=5, chunk_size=10, noise_block=5).images
    assert not torch.allclose(other[:4], one[:4])  # the block is part of what an image is


def test_noise_block_1_seeds_image_i_with_seed_plus_i(net):
    """EDM's per-image seeds, recomputed by hand: image i alone, from torch.Generator().manual_seed(seed + i)."""
    d, spec = diffusion(), SamplerSpec("ddim", steps=6, eta=0.5)
    drawn = draw(net, d, spec, 5, shape=(1, 4, 4), seed=11, chunk_size=5, noise_block=1)
    net.eval()
    for i in range(5):
        gen = torch.Generator().manual_seed(11 + i)
        x_T = torch.randn(1, 1, 4, 4, generator=gen)
        with torch.no_grad():
            expected = ddim_sample(d.denoiser(net, clip=True), x_T, num_steps=6, eta=0.5, generator=gen).x0.clamp(-1, 1)
        torch.testing.assert_close(drawn.images[i:i + 1], expected, rtol=0, atol=1e-6)


def test_image_numbers_outside_the_draw_are_one_line():
    with pytest.raises(UserError, match=r"seeds asks for images 3..12 of num_samples=10 \(numbered 0..9\); raise "
                       "num_samples to 13"):
        check_index([3, 12], 10)


SOLVER_CALLS = {  # what each fast sampler's defaults must amount to, written out: num_steps=6 and the rest
    "dpmpp_2m": lambda *a, **k: dpmpp_2m_sample(*a, num_steps=6, spacing="logsnr", **k),
    "dpmpp_2m_sde": lambda *a, **k: dpmpp_2m_sde_sample(*a, num_steps=6, spacing="logsnr", eta=1.0, **k),
    "unipc": lambda *a, **k: unipc_sample(*a, num_steps=6, spacing="logsnr", order=3, **k),
    "heun": lambda *a, **k: heun_sample(*a, num_steps=6, spacing="karras", **k),
}


@pytest.mark.parametrize("name", FAST)
def test_draw_runs_each_fast_sampler_with_its_defaults_and_seeds(name, net):
    d = diffusion()
    drawn = draw(net, d, SamplerSpec(name, steps=6), 5, shape=(1, 4, 4), seed=4, chunk_size=3, noise_block=3)
    net.eval()
    for k, start, stop in [(0, 0, 3), (1, 3, 5)]:
        gen = torch.Generator().manual_seed(4 + k)
        x_T = torch.randn(3, 1, 4, 4, generator=gen)  # the whole block of 3
        with torch.no_grad():
            expected = SOLVER_CALLS[name](d.denoiser(net, clip=True), x_T, generator=gen).x0.clamp(-1, 1)
        torch.testing.assert_close(drawn.images[start:stop], expected[:stop - start], rtol=0, atol=0)


def counted(net):
    calls = []

    def model(x, t):
        calls.append(int(t[0]))
        return net(x, t)

    return model, calls


@pytest.mark.parametrize("name", ["ddim", "respaced", *FAST])
@pytest.mark.parametrize("steps", [1, 4, 7, 30])
def test_steps_is_a_budget_of_network_calls_and_nfe_counts_them(name, steps, net):
    model, calls = counted(net)
    spec = SamplerSpec(name, steps=steps)
    draw_chunk(model, diffusion(), spec, range(2), shape=(1, 4, 4))
    assert len(calls) == spec.nfe(diffusion()) <= steps
    assert len(calls) == (2 * ((steps + 1) // 2) - 1 if name == "heun" else steps)
    model, calls = counted(net)
    draw_chunk(model, diffusion(), SamplerSpec("ddpm"), range(2), shape=(1, 4, 4))
    assert len(calls) == SamplerSpec("ddpm").nfe(diffusion()) == T


@pytest.mark.parametrize("name", ["ddim", "respaced"])
@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_ddim_and_respaced_step_on_the_snr_spacings(name, spacing, net):
    """The model sees exactly the indices space_timesteps picks from the schedule's ᾱ (T-1 first)."""
    d = diffusion()
    model, calls = counted(net)
    draw_chunk(model, d, SamplerSpec(name, steps=6, spacing=spacing), range(2), shape=(1, 4, 4))
    kept = space_timesteps(T, spacing, 6, alphas_cumprod=torch.cumprod(1 - linear_beta_schedule(T, 1e-3, 0.2), 0))
    assert calls == kept[::-1] and kept != space_timesteps(T, "linspace", 6)


def test_the_images_do_not_depend_on_the_device_count(net):
    d, spec = diffusion(), SamplerSpec("ddpm")
    one = draw(net, d, spec, 11, shape=(1, 4, 4), seed=3, chunk_size=3)
    for world in (2, 3, 5):
        parts = [draw(net, d, spec, 11, shape=(1, 4, 4), seed=3, chunk_size=3, rank=r, world_size=world)
                 for r in range(world)]
        index = torch.cat([p.index for p in parts])
        images = torch.cat([p.images for p in parts])[index.argsort()]
        assert sorted(index.tolist()) == list(range(11))
        torch.testing.assert_close(images, one.images, rtol=0, atol=0)
    assert draw(net, d, spec, 2, shape=(1, 4, 4), chunk_size=3, rank=1, world_size=2).images.shape == (0, 1, 4, 4)


def test_chunk_bounds_cover_every_image_once_whatever_the_world_size():
    for world in (1, 2, 3, 8):
        chunks = sorted(c for r in range(world) for c in chunk_bounds(103, 10, r, world))
        assert chunks == [(k, 10 * k, min(103, 10 * k + 10)) for k in range(11)]


def test_draw_samples_in_eval_mode_and_restores_the_mode(net):
    d, spec = diffusion(), SamplerSpec("ddim", steps=4)
    net.train()
    a = draw(net, d, spec, 3, shape=(1, 4, 4), seed=1).images
    b = draw(net, d, spec, 3, shape=(1, 4, 4), seed=1).images
    assert torch.equal(a, b) and net.training  # dropout was off inside, and the mode is back


def test_trajectory_and_clamping(net):
    d = diffusion()
    out = draw_chunk(net, d, SamplerSpec("ddpm", clip_denoised=False), range(3), shape=(1, 4, 4), seed=2, noise_block=3,
                     record_steps=[0, 10, T - 1])
    assert out.trajectory.steps == [T - 1, 10, 0] and out.trajectory.x_t.shape == (3, 3, 1, 4, 4)
    assert out.x0.abs().max() <= 1
    gen = torch.Generator().manual_seed(2)
    x_T = torch.randn(3, 1, 4, 4, generator=gen)
    torch.testing.assert_close(out.trajectory.x_t[0], x_T, rtol=0, atol=0)
    with torch.no_grad():
        raw = ddpm_sample(d.denoiser(net.eval(), clip=False), x_T, generator=gen).x0
    torch.testing.assert_close(out.x0, raw.clamp(-1, 1), rtol=0, atol=0)
