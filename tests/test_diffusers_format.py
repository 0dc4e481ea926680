"""diffusers folders in and out, checked against the real diffusers (a dev dependency) on folders built here."""

import inspect
import json
import math
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from diffusion.core.sampling import ddim_sample, ddpm_sample, euler_sample
from diffusion.core.schedules import cosine_beta_schedule, linear_beta_schedule, space_timesteps
from diffusion.errors import UserError
from diffusion.formats.diffusers import read_diffusers_folder, write_diffusers_folder
from diffusion.formats.diffusers_schedulers import SCHEDULER_DEFAULTS
from diffusion.formats.diffusers_unet import UNET_DEFAULTS
from diffusion.nn import UNet
from helpers import ddpm, edm, flow, model_kwargs, paper_betas

OURS = dict(in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
            dropout=0.0, image_size=16, num_groups=8, resamp_with_conv=True, channels_last=False,
            num_classes=None)  # fmt: skip
# The same network as diffusers builds it (google/ddpm-cifar10-32's settings at a small size).
THEIRS = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
              attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)  # fmt: skip
CASES = [("eps", "fixed_large"), ("x0", "fixed_small"), ("v", "learned_range")]


@pytest.fixture(autouse=True)
def quiet_diffusers():
    diffusers.utils.logging.set_verbosity_error()


def our_unet(learned_variance: bool = False, seed: int = 0) -> UNet:
    """Our small U-Net with every parameter nudged, so the zero-initialised layers hide nothing."""
    torch.manual_seed(seed)
    model = UNet(**OURS, learned_variance=learned_variance)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_pipeline(folder: Path, unet_overrides: dict | None = None, scheduler: str = "DDPMScheduler",
                  **scheduler_kwargs) -> Path:
    """A DDPMPipeline folder written by diffusers' own save_pretrained: unet/, scheduler/, model_index.json."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**{**THEIRS, **(unet_overrides or {})})
    sched = getattr(diffusers, scheduler)(**{"num_train_timesteps": 10, **scheduler_kwargs})
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def spec_of(betas: torch.Tensor, parameterization: str = "eps", variance: str = "fixed_large") -> dict:
    """A DDPM objective spec over these betas."""
    return ddpm(betas, parameterization=parameterization, variance=variance).spec()


def exported(tmp_path: Path, parameterization: str, variance: str, betas: torch.Tensor, **kw) -> tuple[UNet, Path]:
    net = our_unet(learned_variance=variance == "learned_range")
    spec = spec_of(betas, parameterization, variance)
    out = write_diffusers_folder(tmp_path / "export", OURS, net.state_dict(), spec, "# A test model\n", **kw)
    return net, out


def read_ddpm(folder: Path) -> tuple[dict, dict, torch.Tensor, str, str, dict]:
    """(unet kwargs, state, betas float64, parameterization, variance, info) of a DDPM folder."""
    kwargs, state, spec, info = read_diffusers_folder(folder)
    assert spec["_target_"].endswith(".DDPM"), spec
    betas = torch.tensor(spec["betas"], dtype=torch.float64)
    return kwargs, state, betas, spec["parameterization"], spec["variance"], info


def load_pipeline(folder: Path) -> diffusers.DDPMPipeline:
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- a missing field means diffusers' default ------------------------------------------------------
def test_defaults_are_those_of_the_installed_diffusers():
    """A missing field means diffusers' default: our table of them must be diffusers' own."""

    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}

    assert {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_DEFAULTS.items()} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in defaults(diffusers.UNet2DModel).items()}
    for name, ours in SCHEDULER_DEFAULTS.items():
        assert ours == defaults(getattr(diffusers, name)), name


# --- export: diffusers loads the folder and samples what we sample ---------------------------------------
@pytest.mark.parametrize(("parameterization", "variance"), CASES)
def test_ddpm_pipeline_samples_as_our_ancestral_sampler(tmp_path, parameterization, variance):
    """DDPMPipeline draws x_T then each step's z from one generator, as ddpm_sample: same seed, same noise."""
    T = 8
    net, folder = exported(tmp_path, parameterization, variance, linear_beta_schedule(T, 1e-3, 0.2))
    pipe = load_pipeline(folder)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=T,
                  output_type="pt").images  # (B, C, H, W) in [0, 1]  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 3, 16, 16, generator=gen)
    objective = ddpm(linear_beta_schedule(T, 1e-3, 0.2), parameterization=parameterization, variance=variance)
    with torch.no_grad():
        ours = ddpm_sample(objective.denoiser(net, clip=True), x_T, generator=gen).x0
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert ((ours > 0) & (ours < 1)).float().mean() > 0.3  # most pixels are not clipped away
    torch.testing.assert_close(theirs, ours, atol=5e-6, rtol=0)  # seen: <= 1e-6


@pytest.mark.parametrize(("parameterization", "clip"), [("eps", True), ("eps", False), ("x0", True), ("v", True)])
def test_ddim_pipeline_samples_as_our_ddim(tmp_path, parameterization, clip):
    """DDIMScheduler from the exported config, η = 0, same x_T and timesteps: our DDIM's samples to float32."""
    T, K = 20, 5
    betas = linear_beta_schedule(T, 1e-3, 0.2)
    net, folder = exported(tmp_path, parameterization, "fixed_small", betas, clip_sample=clip)
    pipe = load_pipeline(folder)
    ddim = diffusers.DDIMPipeline(unet=pipe.unet, scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    # use_clipped_model_output: ε re-derived from the clipped x̂0, as our DDIM does (no effect without clipping).
    theirs = ddim(batch_size=2, generator=torch.Generator().manual_seed(5), eta=0.0, num_inference_steps=K,
                  use_clipped_model_output=True, output_type="pt").images  # fmt: skip
    # diffusers' DDIM steps to t - T//K: our "leading" spacing; checked to be the same timesteps.
    assert space_timesteps(T, "leading", K) == sorted(ddim.scheduler.timesteps.tolist())
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        denoiser = ddpm(betas, parameterization=parameterization, variance="fixed_small").denoiser(net, clip=clip)
        ours = ddim_sample(denoiser, x_T, num_steps=K, spacing="leading").x0
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert ((ours > 0) & (ours < 1)).float().mean() > 0.3
    torch.testing.assert_close(theirs, ours, atol=5e-6, rtol=0)  # seen: <= 1e-6


def test_export_writes_the_pipeline_layout_and_the_card(tmp_path):
    betas = cosine_beta_schedule(10, 0.008, 0.999)
    _, folder = exported(tmp_path, "v", "learned_range", betas)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]  # fmt: skip
    assert (folder / "README.md").read_text() == "# A test model\n"
    pipe = load_pipeline(folder)
    ours = sum(p.numel() for p in our_unet(True).parameters())
    assert pipe.unet.config.out_channels == 6 and pipe.unet.num_parameters() == ours
    sched = pipe.scheduler.config
    assert (sched.prediction_type, sched.variance_type, sched.clip_sample) == ("v_prediction", "learned_range", True)
    assert json.loads((folder / "scheduler/scheduler_config.json").read_text())["trained_betas"] == betas.tolist()
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary folder was renamed, not left behind


# --- import: our U-Net computes diffusers' function -----------------------------------------------------
@pytest.mark.slow
def test_paper_cifar10_unet_from_diffusers_computes_the_same(tmp_path):
    """A random UNet2DModel of the paper's CIFAR-10 configuration (35,746,307 parameters), imported."""
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2, dropout=0.1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_eps=1e-6,
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    ).eval()  # fmt: skip
    assert theirs.num_parameters() == 35_746_307
    theirs.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(variance_type="fixed_large").save_pretrained(tmp_path / "scheduler")
    kwargs, state, betas, parameterization, variance, _ = read_ddpm(tmp_path)
    cifar10 = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs("data=cifar10").items()}
    cifar10["channels_last"] = False  # a memory layout, not part of the network: diffusers' is NCHW
    assert kwargs == cifar10  # conf/model/cifar10.yaml's net, dropout 0.1 included
    ours = UNet(**kwargs).eval()
    ours.load_state_dict(state)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 999])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, atol=1e-5, rtol=0)  # seen: 3e-6
    torch.testing.assert_close(betas, paper_betas(1000), atol=0, rtol=0)
    assert (parameterization, variance) == ("eps", "fixed_large")


@pytest.mark.parametrize("layout", ["pipeline", "pipeline-bin", "flat", "legacy-attention-names"])
def test_small_unet_from_diffusers_computes_the_same(tmp_path, layout):
    """Both weight formats, both folder layouts, and pre-0.15 attention names (query/key/value/proj_attn)."""
    folder = save_pipeline(tmp_path / "pipe", {"out_channels": 6}, variance_type="learned_range")
    theirs = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    if layout == "pipeline-bin":
        theirs.save_pretrained(folder / "unet", safe_serialization=False)
        (folder / "unet/diffusion_pytorch_model.safetensors").unlink()
    if layout == "flat":
        for file in [*(folder / "unet").iterdir(), *(folder / "scheduler").iterdir()]:
            file.rename(folder / file.name)
        (folder / "unet").rmdir()
        (folder / "scheduler").rmdir()
    if layout == "legacy-attention-names":
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        state = {}
        for k, v in theirs.state_dict().items():
            for new, legacy in old.items():
                k = k.replace(f".{new}.", f".{legacy}.")
            state[k] = v
        torch.save(state, folder / "unet/diffusion_pytorch_model.bin")
        (folder / "unet/diffusion_pytorch_model.safetensors").unlink()
    kwargs, state, _, _, variance, info = read_ddpm(folder)
    assert kwargs == OURS and variance == "learned_range" and info["weights"].endswith(
        ".bin" if layout in ("pipeline-bin", "legacy-attention-names") else ".safetensors")
    ours = UNet(**kwargs, learned_variance=True).eval()
    ours.load_state_dict(state)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, atol=1e-5, rtol=1e-5)


def test_equivalent_spellings_are_accepted(tmp_path):
    """Single-head attention_head_dim, 'swish', time_embedding_dim = 4 ch, attn_norm_num_groups = norm_num_groups."""
    spelled = dict(attention_head_dim=32, act_fn="swish", time_embedding_dim=64, attn_norm_num_groups=8)
    folder = save_pipeline(tmp_path, spelled)
    theirs = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    kwargs, state, *_ = read_diffusers_folder(folder)
    ours = UNet(**kwargs).eval()
    ours.load_state_dict(state)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, atol=1e-5, rtol=0)


# --- round trip -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("parameterization", "variance"), CASES)
def test_round_trip_is_exact(tmp_path, parameterization, variance):
    betas = cosine_beta_schedule(50, 0.008, 0.999)  # irrational float64 values: any rounding would show
    net, folder = exported(tmp_path, parameterization, variance, betas)
    kwargs, state, betas_back, param_back, variance_back, info = read_ddpm(folder)
    assert kwargs == OURS and (param_back, variance_back) == (parameterization, variance)
    assert betas_back.dtype == torch.float64 and torch.equal(betas_back, betas)
    assert state.keys() == net.state_dict().keys()
    for name, value in net.state_dict().items():
        assert torch.equal(state[name], value), name
    assert info["beta_schedule"] == "trained_betas" and info["clip_sample"] is True


def test_export_from_a_channels_last_model_keeps_the_values(tmp_path):
    net = UNet(**{**OURS, "channels_last": True})
    net.load_state_dict(our_unet().state_dict())
    _, state, *_ = read_diffusers_folder(write_diffusers_folder(
        tmp_path / "out", {**OURS, "channels_last": True}, net.state_dict(), spec_of(paper_betas(10)), ""))
    assert all(torch.equal(state[k], v) for k, v in our_unet().state_dict().items())


# --- schedules, parameterizations and variances map to what diffusers computes ---------------------------
def diffusers_cosine_float64(T: int) -> list[float]:
    """diffusers' betas_for_alpha_bar, recomputed in float64 from its formula (diffusers rounds to float32)."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]


@pytest.mark.parametrize(
    ("fields", "float64"),
    [
        (dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), np.linspace(1e-4, 0.02, 1000)),
        (dict(beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02),
         np.linspace(1e-2, 0.02**0.5, 1000) ** 2),
        (dict(beta_schedule="squaredcos_cap_v2"), diffusers_cosine_float64(1000)),
        (dict(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02),
         1 / (1 + np.exp(-np.linspace(-6, 6, 1000))) * (0.02 - 1e-4) + 1e-4),
        (dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist()), np.linspace(1e-4, 0.02, 1000)),
    ],
    ids=["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "trained_betas"],
)  # fmt: skip
def test_beta_schedules_are_diffusers_formulas_in_float64(tmp_path, fields, float64):
    folder = save_pipeline(tmp_path, num_train_timesteps=1000, **fields)
    _, _, betas, *_ = read_ddpm(folder)
    assert betas.dtype == torch.float64
    torch.testing.assert_close(betas, torch.tensor(float64, dtype=torch.float64), atol=1e-15, rtol=1e-13)
    theirs = load_pipeline(folder).scheduler.betas  # the same formulas, computed (or rounded) in float32
    torch.testing.assert_close(betas.float(), theirs, atol=0, rtol=1e-6)


@pytest.mark.parametrize(("prediction_type", "parameterization"), [("epsilon", "eps"), ("sample", "x0"),
                                                                   ("v_prediction", "v")])  # fmt: skip
def test_prediction_types_map(tmp_path, prediction_type, parameterization):
    folder = save_pipeline(tmp_path, prediction_type=prediction_type)
    assert read_ddpm(folder)[3] == parameterization


@pytest.mark.parametrize(("variance_type", "variance"), [("fixed_small", "fixed_small"),
                                                         ("fixed_small_log", "fixed_small"),
                                                         ("fixed_large", "fixed_large")])  # fmt: skip
def test_variance_types_map(tmp_path, variance_type, variance):
    folder = save_pipeline(tmp_path, variance_type=variance_type)
    assert read_ddpm(folder)[4] == variance


def ddpm_step(variance_type: str, t: int = 5) -> torch.Tensor:
    sched = diffusers.DDPMScheduler(num_train_timesteps=10, variance_type=variance_type, clip_sample=False)
    sched.set_timesteps(10)
    x, out = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).chunk(2)
    return sched.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample


def test_fixed_small_log_samples_as_fixed_small_and_fixed_large_log_is_nan_in_diffusers():
    """Why fixed_small_log maps to fixed_small and fixed_large_log is refused (DDPMScheduler.step, diffusers 0.42)."""
    torch.testing.assert_close(ddpm_step("fixed_small_log"), ddpm_step("fixed_small"), atol=1e-6, rtol=0)
    assert ddpm_step("fixed_large_log").isnan().all()


def test_ddim_folder_reads_with_the_ddpm_default_variance(tmp_path):
    folder = save_pipeline(tmp_path, scheduler="DDIMScheduler", prediction_type="v_prediction", clip_sample=False)
    _, _, betas, parameterization, variance, info = read_ddpm(folder)
    assert (parameterization, variance) == ("v", "fixed_small")  # DDPMScheduler's default, as from_config gives
    assert info["scheduler"] == "DDIMScheduler" and info["variance_type"] is None and info["clip_sample"] is False
    assert info["ignored_fields"] == []
    torch.testing.assert_close(betas, paper_betas(10), atol=0, rtol=0)


def test_fields_the_scheduler_ignores_are_reported_not_refused(tmp_path):
    folder = save_pipeline(tmp_path)
    edit_json(folder / "scheduler/scheduler_config.json", set_alpha_to_one=False, skip_prk_steps=True)
    assert read_diffusers_folder(folder)[3]["ignored_fields"] == ["set_alpha_to_one", "skip_prk_steps"]


# --- refusals: one line naming the field ------------------------------------------------------------------
UNET_REFUSALS = [
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D", "UpBlock2D"]),  # attention down but not up
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"]),
    ("class_embed_type", "timestep"), ("num_class_embeds", 10), ("time_embedding_type", "fourier"),
    ("flip_sin_to_cos", True), ("freq_shift", 0), ("time_embedding_dim", 128), ("norm_eps", 1e-5),
    ("norm_num_groups", None), ("attn_norm_num_groups", 4), ("resnet_time_scale_shift", "scale_shift"),
    ("attention_head_dim", 8), ("downsample_padding", 1), ("downsample_type", "resnet"),
    ("upsample_type", "resnet"), ("center_input_sample", True), ("mid_block_type", None), ("add_attention", False),
    ("mid_block_scale_factor", 2), ("act_fn", "gelu"), ("sample_size", [16, 32]), ("sample_size", 18),
    ("norm_num_groups", 5), ("out_channels", 4),
    ("block_out_channels", [16, 24, 32]), ("some_future_field", 1), ("_class_name", "UNet2DConditionModel"),
]  # fmt: skip
SCHEDULER_REFUSALS = [
    ("_class_name", "PNDMScheduler"), ("beta_schedule", "laplace"), ("prediction_type", "flow_prediction"),
    ("variance_type", "learned"), ("variance_type", "fixed_large_log"), ("variance_type", "learned_range"),
    ("clip_sample_range", 2.0), ("thresholding", True), ("rescale_betas_zero_snr", True), ("steps_offset", 1),
    ("timestep_spacing", "karras"), ("trained_betas", [0.1] * 9), ("trained_betas", [0.0] * 10),
    ("beta_start", 0.5), ("num_train_timesteps", 0),
]  # fmt: skip


def assert_refused(call, field: str) -> None:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and field.split("/")[0] in message, message


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("good"))


@pytest.mark.parametrize(("field", "value"), UNET_REFUSALS, ids=[f"{f}={v}" for f, v in UNET_REFUSALS])
def test_unsupported_unet_field_is_refused(tmp_path, good_folder, field, value):
    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline.from_pretrained(good_folder).save_pretrained(folder)
    edit_json(folder / "unet/config.json", **{field: value})
    assert_refused(lambda: read_diffusers_folder(folder), field)


@pytest.mark.parametrize(("field", "value"), SCHEDULER_REFUSALS, ids=[f"{f}={v}" for f, v in SCHEDULER_REFUSALS])
def test_unsupported_scheduler_field_is_refused(tmp_path, good_folder, field, value):
    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline.from_pretrained(good_folder).save_pretrained(folder)
    edit_json(folder / "scheduler/scheduler_config.json", **{field: value})
    assert_refused(lambda: read_diffusers_folder(folder), field)


def test_ddim_final_step_other_than_alpha_one_is_refused(tmp_path):
    folder = save_pipeline(tmp_path, scheduler="DDIMScheduler", set_alpha_to_one=False)
    assert_refused(lambda: read_diffusers_folder(folder), "set_alpha_to_one")


@pytest.mark.parametrize("weights", ["transposed", "missing", "extra"])
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, good_folder, weights):
    folder = tmp_path / "pipe"
    pipe = diffusers.DDPMPipeline.from_pretrained(good_folder)
    state = dict(pipe.unet.state_dict())
    key = "time_embedding.linear_2.weight" if weights != "transposed" else "time_embedding.linear_1.weight"
    if weights == "transposed":
        state[key] = state[key].T.contiguous()
    elif weights == "missing":
        del state[key]
    else:
        state["extra.weight"] = torch.zeros(1)
    pipe.save_pretrained(folder)
    torch.save(state, folder / "unet/diffusion_pytorch_model.bin")
    (folder / "unet/diffusion_pytorch_model.safetensors").unlink()
    assert_refused(lambda: read_diffusers_folder(folder), "extra.weight" if weights == "extra" else key)


def test_pipeline_with_other_components_is_refused(tmp_path, good_folder):
    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline.from_pretrained(good_folder).save_pretrained(folder)
    edit_json(folder / "model_index.json", vqvae=["diffusers", "VQModel"])
    assert_refused(lambda: read_diffusers_folder(folder), "vqvae")


def test_missing_folder_or_scheduler_is_refused(tmp_path, good_folder):
    assert_refused(lambda: read_diffusers_folder(tmp_path / "nowhere"), "does not exist")
    diffusers.UNet2DModel.from_pretrained(good_folder / "unet").save_pretrained(tmp_path / "unet-only")
    assert_refused(lambda: read_diffusers_folder(tmp_path / "unet-only"), "scheduler_config.json")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(objective="mean"), "parameterization"),
        (dict(objective="learned"), "variance"),
        (dict(unet_kwargs={**OURS, "resamp_with_conv": False}), "resamp_with_conv"),
        (dict(unet_kwargs={**OURS, "ch_mult": (2, 2, 2)}), "ch_mult"),
        (dict(unet_kwargs={**OURS, "out_channels": 1}), "out_channels"),
        (dict(unet_kwargs={**OURS, "width": 3}), "width"),
        (dict(unet_kwargs={**OURS, "learned_variance": True}), "learned_variance"),
        (dict(state_dict={"net." + k: v for k, v in our_unet().state_dict().items()}), "conv_in.bias"),
        (dict(state_dict={**our_unet().state_dict(), "conv_in.weight": torch.zeros(16, 3, 1, 1)}), "conv_in.weight"),
        (dict(out_dir="not-empty"), "not empty"),
    ],
)  # fmt: skip
def test_export_refuses_what_diffusers_cannot_hold(tmp_path, change, field):
    (tmp_path / "not-empty").mkdir()
    (tmp_path / "not-empty" / "file").touch()
    args = dict(out_dir=tmp_path / "new", unet_kwargs=OURS, state_dict=our_unet().state_dict(),
                objective=spec_of(paper_betas(10)), card_markdown="")
    args.update({k: tmp_path / v if k == "out_dir" else v for k, v in change.items()})
    if change.get("objective") == "mean":
        args["objective"] = spec_of(paper_betas(10), "mean")
    if change.get("objective") == "learned":  # no DDPM takes it: written into a spec by hand
        args["objective"] = {**spec_of(paper_betas(10)), "variance": "learned"}
    assert_refused(lambda: write_diffusers_folder(**args), field)
    assert not (tmp_path / "new").exists()


# --- EDM and flow matching: exported to their diffusers schedulers, sampled there as here ------------------------
def sample_with_scheduler(unet, scheduler, x: torch.Tensor, num_steps: int, **timesteps) -> torch.Tensor:
    """diffusers' own loop for a scheduler: set_timesteps, scale_model_input (EDM's c_in; flow has none), the UNet,
    step (no pipeline)."""
    scheduler.set_timesteps(num_steps, **timesteps) if not timesteps else scheduler.set_timesteps(**timesteps)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scale(x, t), t).sample
            x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("num_steps", [5, 18])
def test_edm_folder_samples_with_edm_euler_scheduler_as_our_euler(tmp_path, num_steps):
    """EDMEulerScheduler (Karras et al.'s ρ = 7 grid, c_in, c_noise = ln(σ)/4, c_skip/c_out): our Euler on the same
    karras levels from the same x_T, and ConsistencyModelPipeline (model_index.json's) runs it the same way."""
    objective = edm()
    net = our_unet()
    folder = write_diffusers_folder(tmp_path / "edm", OURS, net.state_dict(), objective.spec(), "")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "ConsistencyModelPipeline"
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.EDMEulerScheduler.from_pretrained(folder / "scheduler")
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * scheduler.init_noise_sigma
    theirs = sample_with_scheduler(unet, scheduler, x_T, num_steps)
    with torch.no_grad():
        ours = euler_sample(objective.denoiser(net, clip=False), x_T, num_steps=num_steps, spacing="karras").x0
    assert theirs.abs().max() > 0.1  # a real image, not everything denoised to 0
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=num_steps, generator=torch.Generator().manual_seed(4),
                  output_type="pt").images
    torch.testing.assert_close(images, (ours / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)


def test_flow_folder_samples_with_ddpm_pipeline_as_our_euler(tmp_path):
    """FlowMatchEulerDiscreteScheduler under DDPMPipeline (model_index.json's): t from 1 down to 1/1000, the UNet's
    timestep 1000 t, x ← x + (t' − t) v: our Euler on flow's linspace grid from the same x_T."""
    objective, net, steps = flow(), our_unet(), 8
    folder = write_diffusers_folder(tmp_path / "flow", OURS, net.state_dict(), objective.spec(), "")
    pipe = load_pipeline(folder)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(6), num_inference_steps=steps,
                  output_type="pt").images
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = euler_sample(objective.denoiser(net, clip=False), x_T, num_steps=steps, spacing="linspace").x0
    torch.testing.assert_close(theirs, (ours / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


def test_flow_shift_samples_as_diffusers_with_the_same_levels(tmp_path):
    """With a shift, our linspace grid is diffusers' for the unshifted levels linspace(1, t_min) given as `sigmas`
    (its default grid shifts its low end twice): the same steps."""
    objective, net, steps = flow(shift=3.0), our_unet(), 6
    folder = write_diffusers_folder(tmp_path / "flow", OURS, net.state_dict(), objective.spec(), "")
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.shift == 3.0
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    theirs = sample_with_scheduler(unet, scheduler, x_T, steps, sigmas=np.linspace(1.0, 1e-3, steps).tolist())
    with torch.no_grad():
        ours = euler_sample(objective.denoiser(net, clip=False), x_T, num_steps=steps, spacing="linspace").x0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("objective", [edm(sigma_data=0.7, sigma_max=40.0), flow(shift=2.0)], ids=["edm", "flow"])
def test_edm_and_flow_round_trip(tmp_path, objective):
    net = our_unet()
    folder = write_diffusers_folder(tmp_path / "out", OURS, net.state_dict(), objective.spec(), "")
    kwargs, state, spec, info = read_diffusers_folder(folder)
    assert kwargs == OURS and all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert spec["_target_"] == objective.spec()["_target_"] and info["ignored_fields"] == []
    for key in ("sigma_data", "sigma_min", "sigma_max", "shift", "t_min"):
        assert spec.get(key) == objective.spec().get(key), key


@pytest.mark.parametrize(("scheduler", "field", "value"), [
    ("EDMEulerScheduler", "sigma_schedule", "exponential"), ("EDMEulerScheduler", "prediction_type", "v_prediction"),
    ("EDMEulerScheduler", "rho", 5.0), ("FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting", True),
    ("FlowMatchEulerDiscreteScheduler", "num_train_timesteps", 500),
    ("FlowMatchEulerDiscreteScheduler", "stochastic_sampling", True)])
def test_edm_and_flow_folders_our_objectives_cannot_reproduce_are_refused(tmp_path, scheduler, field, value):
    folder = save_pipeline(tmp_path, scheduler=scheduler, **{"num_train_timesteps": 1000, field: value})
    assert_refused(lambda: read_diffusers_folder(folder), field)
