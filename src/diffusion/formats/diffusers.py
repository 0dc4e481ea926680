"""Read and write Hugging Face diffusers folders (UNet2DModel + DDPMScheduler/DDIMScheduler), without diffusers.

Import maps a folder's UNet2DModel to our U-Net's keyword arguments and weights (`formats.diffusers_unet`), and its
scheduler config to float64 betas, a parameterization and a variance. Export writes a folder that
`diffusers.DDPMPipeline.from_pretrained` loads, with our float64 betas as `trained_betas` (the exact schedule).
Whatever our U-Net or samplers cannot reproduce is refused with a one-line UserError naming the field; a missing
field takes diffusers 0.42's default, as diffusers itself does.
"""

import json
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from diffusion.core.objectives.base import objective_class
from diffusion.core.objectives.ddpm import DDPM
from diffusion.core.schedules import (
    cosine_beta_schedule,
    linear_beta_schedule,
    quadratic_beta_schedule,
    sigmoid_beta_schedule,
)
from diffusion.errors import UserError
from diffusion.formats.diffusers_unet import (
    DIFFUSERS_VERSION,
    check_state_dict,
    from_diffusers_state_dict,
    refuse,
    to_diffusers_state_dict,
    unet_config_from_kwargs,
    unet_kwargs_from_config,
)

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_SCHEDULER_COMMON = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    clip_sample=True, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading", steps_offset=0,
    rescale_betas_zero_snr=False,
)  # fmt: skip
SCHEDULER_DEFAULTS = {
    "DDPMScheduler": {**_SCHEDULER_COMMON, "variance_type": "fixed_small"},
    "DDIMScheduler": {**_SCHEDULER_COMMON, "set_alpha_to_one": True},
}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# DDPMScheduler.step draws with std sqrt(β̃) for both fixed_small and fixed_small_log (the latter stores the std).
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  "learned_range": "learned_range"}  # fmt: skip


# --- DDPMScheduler / DDIMScheduler config <-> betas, parameterization, variance ---------------------------
DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")  # diffusers' schedulers' timestep_spacing values


def _betas_from_config(c: dict, file: Path | str) -> Tensor:
    """The float64 betas the config describes (diffusers builds the same formulas in float32)."""
    T = c["num_train_timesteps"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise refuse(file, "num_train_timesteps", T, "it must be an integer >= 1")
    if c["trained_betas"] is not None:
        betas = torch.tensor([float(b) for b in c["trained_betas"]], dtype=torch.float64)
        if len(betas) != T or not ((betas > 0) & (betas < 1)).all():
            raise refuse(file, "trained_betas", f"{len(betas)} values", f"it needs {T} (num_train_timesteps) in (0, 1)")
        return betas
    name, start, end = c["beta_schedule"], c["beta_start"], c["beta_end"]
    if name == "squaredcos_cap_v2":  # diffusers' betas_for_alpha_bar: s = 0.008, max_beta = 0.999; start/end unused
        return cosine_beta_schedule(T, s=0.008, max_beta=0.999)
    schedules = {"linear": linear_beta_schedule, "scaled_linear": quadratic_beta_schedule,
                 "sigmoid": sigmoid_beta_schedule}  # fmt: skip
    if name not in schedules:
        raise refuse(file, "beta_schedule", name, f"choose one of {[*schedules, 'squaredcos_cap_v2']} or trained_betas")
    if not 0 < start < end < 1:
        raise refuse(file, "beta_start/beta_end", (start, end), "they must satisfy 0 < beta_start < beta_end < 1")
    return schedules[name](T, start, end)


def _check_sampling_fields(c: dict, cls: str, file: Path | str) -> None:
    """Refuse the sampler settings our samplers cannot reproduce."""
    refusals = [
        ("rescale_betas_zero_snr", False, "a zero terminal SNR needs beta_T = 1, outside our (0, 1)"),
        ("thresholding", False, "our samplers clip x0 to [-1, 1] or not at all, without dynamic thresholding"),
        ("steps_offset", 0, "our timestep spacings have no offset"),
    ]
    if cls == "DDIMScheduler":  # a DDPMScheduler ignores it
        refusals.append(("set_alpha_to_one", True, "our DDIM's last step goes to alpha_cumprod = 1"))
    for field, value, why in refusals:
        if c[field] != value:
            raise refuse(file, field, c[field], f"{why}; it must be {value!r}")
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        raise refuse(file, "clip_sample_range", c["clip_sample_range"], "our samplers clip x0 to [-1, 1]; use 1.0")
    if c["timestep_spacing"] not in DIFFUSERS_SPACINGS:
        raise refuse(file, "timestep_spacing", c["timestep_spacing"], f"choose one of {list(DIFFUSERS_SPACINGS)}")


def schedule_from_config(cfg: dict, learned_variance: bool,
                         file: Path | str = "scheduler_config.json") -> tuple[Tensor, str, str, dict]:
    """(betas float64, parameterization, variance, info) from a DDPMScheduler or DDIMScheduler config."""
    cls = cfg.get("_class_name")
    if cls not in SCHEDULER_DEFAULTS:
        raise refuse(file, "_class_name", cls, f"only {sorted(SCHEDULER_DEFAULTS)} configs are read")
    c = {**SCHEDULER_DEFAULTS[cls], **cfg}
    _check_sampling_fields(c, cls, file)
    betas = _betas_from_config(c, file)
    if c["prediction_type"] not in PREDICTION_TYPES:
        raise refuse(file, "prediction_type", c["prediction_type"], f"choose one of {sorted(PREDICTION_TYPES)}")
    # A DDIMScheduler has no variance of its own (one carried over from a DDPMScheduler is kept in its config).
    variance_type = c.get("variance_type", "learned_range" if learned_variance else "fixed_small")
    if variance_type not in VARIANCE_TYPES:
        why = ("DDPMScheduler.step gives NaN with it (sqrt of log beta); set fixed_large if that is what was meant"
               if variance_type == "fixed_large_log" else f"choose one of {sorted(VARIANCE_TYPES)}")
        raise refuse(file, "variance_type", variance_type, why)
    if (variance_type == "learned_range") != learned_variance:
        raise refuse(file, "variance_type", variance_type, "learned_range goes with a UNet whose out_channels is "
                     "twice its in_channels, and only then")
    info = {"scheduler": cls, "beta_schedule": "trained_betas" if c["trained_betas"] else c["beta_schedule"],
            "variance_type": c.get("variance_type"), "clip_sample": bool(c["clip_sample"]),
            "timestep_spacing": c["timestep_spacing"],
            "ignored_fields": sorted(k for k in cfg if not k.startswith("_") and k != "variance_type"
                                     and k not in SCHEDULER_DEFAULTS[cls])}  # fmt: skip
    return betas, PREDICTION_TYPES[c["prediction_type"]], VARIANCE_TYPES[variance_type], info


def scheduler_config(betas: Tensor, parameterization: str, variance: str, clip_sample: bool = True) -> dict:
    """The DDPMScheduler config of our diffusion: the exact float64 betas as trained_betas."""
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}
    if parameterization not in prediction:
        raise UserError(f"parameterization {parameterization!r} cannot be exported: diffusers' schedulers predict "
                        f"{sorted(prediction)} only")
    if variance not in ("fixed_small", "fixed_large", "learned_range"):
        raise UserError(f"variance {variance!r} cannot be exported; use fixed_small, fixed_large or learned_range")
    betas = [float(b) for b in torch.as_tensor(betas, dtype=torch.float64)]
    return {
        **SCHEDULER_DEFAULTS["DDPMScheduler"],
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": len(betas),
        "beta_start": betas[0], "beta_end": betas[-1], "trained_betas": betas, "variance_type": variance,
        "prediction_type": prediction[parameterization], "clip_sample": clip_sample,
    }  # fmt: skip


def scheduler_of(objective: dict, clip_sample: bool = True) -> dict:
    """The diffusers scheduler config of an objective spec; what diffusers cannot express is refused in one line."""
    name = objective_class(objective).name
    if name != "ddpm":
        raise UserError(f"objective={name} cannot be exported yet: only DDPM maps to a diffusers scheduler here")
    return scheduler_config(torch.as_tensor(objective["betas"], dtype=torch.float64), objective["parameterization"],
                            objective["variance"], clip_sample)


def learned_variance_of(objective: dict) -> bool:
    return objective.get("variance") == "learned_range"


# --- folders ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore it from the original folder") from err
    if not isinstance(content, dict):
        raise UserError(f"{path} holds a {type(content).__name__}, not a JSON object; restore it from the original")
    return content


def _find(folder: Path, sub: str, name: str) -> Path:
    """folder/name, else folder/sub/name (the layout DDPMPipeline.save_pretrained writes)."""
    for path in (folder / name, folder / sub / name):
        if path.is_file():
            return path
    raise UserError(f"no {name} in {folder} or {folder / sub}; point at a diffusers folder with a UNet2DModel and "
                    f"a DDPM or DDIM scheduler")


def _load_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """The UNet's weights from diffusion_pytorch_model.safetensors or .bin, on the CPU."""
    for name in WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".bin"):
            return torch.load(path, map_location="cpu", weights_only=True), path
        return safetensors.torch.load_file(path, device="cpu"), path
    raise UserError(f"no {' or '.join(WEIGHTS)} in {folder} (sharded or variant weights are not read); "
                    f"save the UNet again with save_pretrained and no max_shard_size or variant")


# A diffusers folder does not say how its model was trained: DDPM's paper settings stand in for the loss.
RELEASED_DDPM_TRAINING = {"loss": "simple", "vlb_weight": 0.001, "min_snr_gamma": None, "timesteps": "uniform"}


def ddpm_spec(betas: Tensor, parameterization: str, variance: str) -> dict:
    """The DDPM objective spec of a folder's scheduler (its training loss unknown: the paper's)."""
    return {"_target_": f"{DDPM.__module__}.{DDPM.__qualname__}", "betas": [float(b) for b in betas],
            "parameterization": parameterization, "variance": variance, **RELEASED_DDPM_TRAINING}


def read_diffusers_folder(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor], dict, dict]:
    """(unet_kwargs, state_dict, objective spec, info) of a local diffusers folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"diffusers folder {folder} does not exist; give a local folder written by save_pretrained")
    index_file = folder / "model_index.json"
    index = _read_json(index_file) if index_file.is_file() else {}
    other = sorted(k for k in index if not k.startswith("_") and k not in ("unet", "scheduler"))
    if other:
        raise refuse(index_file, other[0], index[other[0]], "only a UNet and a scheduler make a pixel-space DDPM "
                     "(no VAE, text encoder, ...)")
    unet_file = _find(folder, "unet", "config.json")
    scheduler_file = _find(folder, "scheduler", "scheduler_config.json")
    unet_kwargs, learned_variance = unet_kwargs_from_config(_read_json(unet_file), unet_file)
    betas, parameterization, variance, info = schedule_from_config(
        _read_json(scheduler_file), learned_variance, scheduler_file)
    weights, weights_file = _load_weights(unet_file.parent)
    state_dict = from_diffusers_state_dict(weights, unet_kwargs, learned_variance, weights_file)
    info.update(unet_config=str(unet_file), scheduler_config=str(scheduler_file), weights=str(weights_file))
    return unet_kwargs, state_dict, ddpm_spec(betas, parameterization, variance), info


def write_diffusers_folder(out_dir: str | os.PathLike, unet_kwargs: dict, state_dict: dict[str, Tensor],
                           objective: dict, card_markdown: str, *, clip_sample: bool = True) -> Path:
    """Write a DDPMPipeline folder (model_index.json, unet/, scheduler/, README.md); refuse what diffusers lacks."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export folder {out} already exists and is not empty; choose a new folder or remove it")
    learned = learned_variance_of(objective)
    scheduler = scheduler_of(objective, clip_sample)
    unet = unet_config_from_kwargs(unet_kwargs, learned)
    check_state_dict(state_dict, unet_kwargs, learned)
    weights = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for k, v in to_diffusers_state_dict(state_dict, len(unet["block_out_channels"])).items()}
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
    # Written beside the target and renamed at the end: a failure leaves no half-written folder.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        (tmp / "unet").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        for file, content in [("model_index.json", index), ("unet/config.json", unet),
                              ("scheduler/scheduler_config.json", scheduler)]:  # fmt: skip
            (tmp / file).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        safetensors.torch.save_file(weights, tmp / "unet" / WEIGHTS[0], metadata={"format": "pt"})
        (tmp / "README.md").write_text(card_markdown)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
