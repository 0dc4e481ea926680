"""diffusers scheduler configs <-> our objectives' specs, without diffusers: DDPMScheduler and DDIMScheduler for
DDPM (its exact float64 betas as trained_betas), EDMEulerScheduler for EDM (Karras et al.'s preconditioning and ρ = 7
grid), FlowMatchEulerDiscreteScheduler for flow matching (its UNet sees 1000 t, our network's input). Whatever a
scheduler cannot express, or our objectives cannot reproduce, is refused with a one-line UserError naming the
field; a missing field takes diffusers 0.42's default, as diffusers itself does. A folder does not say how its model
was trained: the objectives' defaults, the papers' training settings, stand in (RELEASED_TRAINING)."""

from pathlib import Path

import torch
from torch import Tensor

from diffusion.core.denoiser import KARRAS_RHO
from diffusion.core.objectives.base import objective_class
from diffusion.core.objectives.ddpm import DDPM, DDPMObjectiveConfig
from diffusion.core.objectives.edm import EDM, EDMObjectiveConfig
from diffusion.core.objectives.flow import TIME_SCALE, Flow, FlowObjectiveConfig
from diffusion.core.schedules import (
    cosine_beta_schedule,
    linear_beta_schedule,
    quadratic_beta_schedule,
    sigmoid_beta_schedule,
)
from diffusion.errors import UserError
from diffusion.formats.diffusers_unet import DIFFUSERS_VERSION, refuse

_SCHEDULER_COMMON = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    clip_sample=True, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading", steps_offset=0,
    rescale_betas_zero_snr=False,
)  # fmt: skip
SCHEDULER_DEFAULTS = {
    "DDPMScheduler": {**_SCHEDULER_COMMON, "variance_type": "fixed_small"},
    "DDIMScheduler": {**_SCHEDULER_COMMON, "set_alpha_to_one": True},
    "EDMEulerScheduler": dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras",
                              num_train_timesteps=1000, prediction_type="epsilon", rho=7.0, final_sigmas_type="zero"),
    "FlowMatchEulerDiscreteScheduler": dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, time_shift_type="exponential",
        stochastic_sampling=False),
}
DDPM_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
# The pipeline that samples each scheduler's folder: DDPMPipeline gives the UNet the scheduler's timesteps and steps
# with it, right for DDPM and flow matching; EDM's needs scale_model_input (c_in), which ConsistencyModelPipeline calls.
PIPELINES = {"DDPMScheduler": "DDPMPipeline", "EDMEulerScheduler": "ConsistencyModelPipeline",
             "FlowMatchEulerDiscreteScheduler": "DDPMPipeline"}


def _defaults(schema: type, *keys: str) -> dict:
    """The schema's defaults of these settings (the papers' own, written there once)."""
    return {k: getattr(schema(), k) for k in keys}


# A folder does not say how its model was trained: the objectives' defaults (the papers' settings) stand in.
RELEASED_TRAINING = {
    "ddpm": _defaults(DDPMObjectiveConfig, "loss", "vlb_weight", "min_snr_gamma", "timesteps"),
    "edm": _defaults(EDMObjectiveConfig, "p_mean", "p_std"),
    "flow": _defaults(FlowObjectiveConfig, "t_distribution", "logit_mean", "logit_std", "sigma_max"),
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
                 "sigmoid": lambda *a: sigmoid_beta_schedule(*a, 6.0)}  # diffusers' sigmoid spans [-6, 6]
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
    if cls not in DDPM_SCHEDULERS:
        raise refuse(file, "_class_name", cls, f"only {sorted(DDPM_SCHEDULERS)} configs describe a DDPM")
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




def _ignored(cfg: dict, cls: str) -> list[str]:
    return sorted(k for k in cfg if not k.startswith("_") and k not in SCHEDULER_DEFAULTS[cls])


# --- EDMEulerScheduler <-> EDM -----------------------------------------------------------------------------------
def edm_scheduler_config(spec: dict) -> dict:
    """EDM as diffusers' EDMEulerScheduler: its σ range and σ_data, Karras et al.'s ρ = 7 grid, ε-prediction (their
    name for D = c_skip x + c_out F), c_noise = ln(σ)/4 as the UNet's timestep."""
    return {**SCHEDULER_DEFAULTS["EDMEulerScheduler"], "_class_name": "EDMEulerScheduler",
            "_diffusers_version": DIFFUSERS_VERSION, "sigma_min": spec["sigma_min"], "sigma_max": spec["sigma_max"],
            "sigma_data": spec["sigma_data"], "rho": KARRAS_RHO}


def edm_from_config(cfg: dict, file: Path | str) -> tuple[dict, dict]:
    """The EDM spec of an EDMEulerScheduler config, and what was read."""
    c = {**SCHEDULER_DEFAULTS["EDMEulerScheduler"], **cfg}
    for field, value, why in [("sigma_schedule", "karras", "our EDM steps on Karras et al.'s ρ grid"),
                              ("prediction_type", "epsilon", "our EDM's network output is F of D = c_skip x + c_out F"),
                              ("rho", KARRAS_RHO, f"our karras spacing has ρ = {KARRAS_RHO:g}"),
                              ("final_sigmas_type", "zero", "our samplers end at σ = 0")]:
        if c[field] != value:
            raise refuse(file, field, c[field], f"{why}; it must be {value!r}")
    spec = {"_target_": f"{EDM.__module__}.{EDM.__qualname__}", "sigma_data": float(c["sigma_data"]),
            "sigma_min": float(c["sigma_min"]), "sigma_max": float(c["sigma_max"]), **RELEASED_TRAINING["edm"]}
    return spec, {"scheduler": "EDMEulerScheduler", "ignored_fields": _ignored(cfg, "EDMEulerScheduler")}


# --- FlowMatchEulerDiscreteScheduler <-> flow matching ---------------------------------------------------------
def flow_scheduler_config(spec: dict) -> dict:
    """Flow matching as FlowMatchEulerDiscreteScheduler: t = σ_diffusers, the UNet's timestep 1000 t, the shift."""
    return {**SCHEDULER_DEFAULTS["FlowMatchEulerDiscreteScheduler"], "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": int(TIME_SCALE), "shift": spec["shift"]}


def flow_from_config(cfg: dict, file: Path | str) -> tuple[dict, dict]:
    """The flow spec of a FlowMatchEulerDiscreteScheduler config, and what was read."""
    c = {**SCHEDULER_DEFAULTS["FlowMatchEulerDiscreteScheduler"], **cfg}
    if c["num_train_timesteps"] != TIME_SCALE:
        raise refuse(file, "num_train_timesteps", c["num_train_timesteps"], f"our flow network takes "
                     f"{TIME_SCALE:g}·t as its timestep; it must be {int(TIME_SCALE)}")
    for field in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                  "use_beta_sigmas", "stochastic_sampling"):
        if c[field]:
            raise refuse(file, field, c[field], "our flow matching has one fixed shift and a deterministic grid; "
                         "it must be false")
    if c["shift_terminal"] is not None:
        raise refuse(file, "shift_terminal", c["shift_terminal"], "our flow grid ends at t_min; it must be null")
    spec = {"_target_": f"{Flow.__module__}.{Flow.__qualname__}", "shift": float(c["shift"]),
            "t_min": 1.0 / c["num_train_timesteps"], **RELEASED_TRAINING["flow"]}
    return spec, {"scheduler": "FlowMatchEulerDiscreteScheduler",
                  "ignored_fields": _ignored(cfg, "FlowMatchEulerDiscreteScheduler")}


# --- any objective ---------------------------------------------------------------------------------------------
def ddpm_spec(betas: Tensor, parameterization: str, variance: str) -> dict:
    """The DDPM objective spec of a folder's scheduler (its training loss unknown: the paper's)."""
    return {"_target_": f"{DDPM.__module__}.{DDPM.__qualname__}", "betas": [float(b) for b in betas],
            "parameterization": parameterization, "variance": variance, **RELEASED_TRAINING["ddpm"]}


def scheduler_of(objective: dict, clip_sample: bool = True) -> dict:
    """The diffusers scheduler config of an objective spec; what diffusers cannot express is refused in one line."""
    name = objective_class(objective).name
    if name == "edm":
        return edm_scheduler_config(objective)
    if name == "flow":
        return flow_scheduler_config(objective)
    if name != "ddpm":
        raise UserError(f"objective={name} has no diffusers scheduler here; export a ddpm, edm or flow model")
    return scheduler_config(torch.as_tensor(objective["betas"], dtype=torch.float64), objective["parameterization"],
                            objective["variance"], clip_sample)


def objective_from_scheduler(cfg: dict, learned_variance: bool, file: Path | str) -> tuple[dict, dict]:
    """(objective spec, info) of a scheduler config: DDPM's, EDM's or flow matching's."""
    cls = cfg.get("_class_name")
    if cls == "EDMEulerScheduler" or cls == "FlowMatchEulerDiscreteScheduler":
        if learned_variance:
            raise refuse(file, "_class_name", cls, "a learned variance (UNet out_channels twice in_channels) is "
                         "DDPM's; this scheduler has none")
        return edm_from_config(cfg, file) if cls == "EDMEulerScheduler" else flow_from_config(cfg, file)
    if cls not in DDPM_SCHEDULERS:
        raise refuse(file, "_class_name", cls, f"only {sorted(SCHEDULER_DEFAULTS)} configs are read")
    betas, parameterization, variance, info = schedule_from_config(cfg, learned_variance, file)
    return ddpm_spec(betas, parameterization, variance), info


def learned_variance_of(objective: dict) -> bool:
    """Whether the objective's network also predicts a variance (DDPM's learned_range)."""
    return objective.get("variance") == "learned_range"
