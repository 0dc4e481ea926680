"""Checks of a composed config that its schema's types cannot express: ranges, choices, cross-group consistency.

They run when the command line is composed (run/jobs/precheck.py, before Hydra starts the job) and again at the
start of each job, so a mistake is one line before anything is built.
"""

import importlib
import math
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.config.build import net_kwargs, objective_of
from diffusion.config.callbacks import PostHocEMAConfig
from diffusion.config.groups import CosineScheduleConfig, LinearScaledScheduleConfig, RangeScheduleConfig
from diffusion.config.rules import check_rules
from diffusion.core.likelihood import largest_prior_bpd
from diffusion.core.posthoc_ema import SIGMA_REL_MAX
from diffusion.core.sampling import SamplerSpec, as_sampler_spec, check_guidance
from diffusion.core.schedules import (
    LINEAR_REFERENCE_TIMESTEPS,
    cosine_beta_schedule,
    linear_beta_schedule,
    linear_scaled_beta_schedule,
)
from diffusion.data import DigitsDataModule, ImageFolderDataModule, StreamingDataModule, check_input_dir
from diffusion.errors import UserError
from diffusion.formats.sources import check_source
from diffusion.metrics.quality import logged_name, result_keys
from diffusion.nn import UNet


def validate(cfg: DictConfig, here: bool = True) -> None:
    """Check a train.py config: every field's rule, then what needs several fields or building a piece (the
    objective with its schedule, the network on the meta device, the data module's constructor, the optimizer on a
    dummy parameter). Nothing here touches a disk, a device or the network; run/jobs/preflight.py does that."""
    check_rules(cfg)
    check_targets(cfg)
    _check_schedule(cfg)
    objective = _built(lambda: objective_of(cfg), "objective")
    _check_prior(cfg, objective)  # before the samplers: their fix for a tiny T would train a chain that ends short
    check_samplers(cfg, objective)
    conditional = cfg.model.get("num_classes") is not None
    for key, node in _walk(cfg):  # a training run's samplers guide only a class-conditional model
        if OmegaConf.get_type(node) is SamplerSpec and node.get("guidance_scale") is not None and not conditional:
            raise UserError(f"{key}.guidance_scale={node.guidance_scale} needs a class-conditional model; set "
                            f"model.num_classes=N or drop {key}.guidance_scale")
        if OmegaConf.get_type(node) is SamplerSpec and conditional:
            check_guidance(node.get("guidance_scale"), cfg.model.num_classes, key, cfg.training.cond_drop_prob)
    _check_cross_fields(cfg, here)
    _check_callbacks_for(cfg, objective)
    if cfg.callbacks.get("quality") is not None:
        check_feature_extractor(cfg.callbacks.quality.feature_extractor, "callbacks.quality.feature_extractor")
        check_fd_dinov2(cfg.callbacks.quality.fd_dinov2, "callbacks.quality.fd_dinov2")
    _check_builds(cfg)


def _check_schedule(cfg: DictConfig) -> None:
    """A beta schedule exactly when the objective takes one (DDPM's betas, which come from the schedule group)."""
    takes = "betas" in cfg.objective
    name = str(cfg.objective._target_).rsplit(".", 1)[-1].lower()
    if takes and cfg.schedule is None:
        raise UserError(f"objective={name} needs a beta schedule, got schedule=none; choose one, e.g. schedule=linear")
    if takes and _plain(cfg.objective, "betas") != _plain(cfg, "schedule"):  # resolved: a DDP worker's config is
        raise UserError(f"objective.betas={_fmt_value(cfg.objective.betas)} is set by the schedule group, not by hand; "
                        "drop objective.betas and choose schedule=linear|cosine|..., or schedule=explicit "
                        "'schedule.betas=[0.0001,...]'")
    if not takes and cfg.schedule is not None:
        chosen = str(cfg.schedule._target_).rsplit(".", 1)[-1].removesuffix("_beta_schedule")
        raise UserError(f"schedule={chosen} is DDPM's beta schedule, but objective={name} draws its own noise levels "
                        f"and takes none; drop schedule={chosen} (or use objective=ddpm)")
    if takes and "betas" in cfg.schedule and cfg.schedule.get("num_timesteps") is not None \
            and cfg.schedule.num_timesteps != len(cfg.schedule.betas):  # explicit: used as given, never resampled
        T, given = cfg.schedule.num_timesteps, len(cfg.schedule.betas)
        raise UserError(f"schedule.num_timesteps={T} differs from the {given} betas of schedule.betas; give {T} betas, "
                        f"or set schedule.num_timesteps=null (T = {given}, their number)")
    if takes and "beta_start" in cfg.schedule and "beta_end" in cfg.schedule:  # linear, quadratic, sigmoid
        start, end = cfg.schedule.beta_start, cfg.schedule.beta_end  # each in (0, 1) by the schema's rules
        if not start < end < 1.0:  # (said as when building the objective found it: "objective: ...")
            fix = _schema_default(RangeScheduleConfig, "beta_end")
            raise UserError(f"objective: schedule.beta_end must be in (beta_start={start}, 1), got {end}; "
                            f"try schedule.beta_end={fix if start < fix else min(2 * start, 0.999):g}")
        T = cfg.schedule.num_timesteps
        if cfg.schedule._target_ == LinearScaledScheduleConfig._target_ and LINEAR_REFERENCE_TIMESTEPS * end >= T:
            shortest = math.floor(LINEAR_REFERENCE_TIMESTEPS * end) + 1
            raise UserError(f"schedule=linear_scaled scales beta_end={end:g} by 1000/T, which reaches 1 at "
                            f"schedule.num_timesteps={T}; use schedule.num_timesteps={shortest} or more, or "
                            "schedule=cosine at this T")


def _check_prior(cfg: DictConfig, objective) -> None:
    """DDPM's chain must end at noise: L_T at most training.max_prior_bpd, else refused with a schedule that does
    reach it at the same T (each proposal checked here, so the fix is never a chain that ends short too)."""
    limit = cfg.training.max_prior_bpd
    if not objective.markov_chain or limit is None:
        return
    T = objective.num_levels
    prior = largest_prior_bpd(objective.diffusion.betas_float64)
    if prior <= limit:
        return
    chosen = str(cfg.schedule._target_).rsplit(".", 1)[-1].removesuffix("_beta_schedule")
    paper = {key: _schema_default(RangeScheduleConfig, key) for key in ("beta_start", "beta_end")}
    cosine = {key: _schema_default(CosineScheduleConfig, key) for key in ("s", "max_beta")}
    proposals = {"cosine": (cosine_beta_schedule, cosine, "")}
    if LINEAR_REFERENCE_TIMESTEPS * paper["beta_end"] < T:  # linear_scaled's last beta stays below 1
        proposals = {"linear_scaled": (linear_scaled_beta_schedule, paper, " (the paper's betas scaled by 1000/T, "
                                       "Nichol & Dhariwal 2021)"), **proposals}
    fix = "raise training.max_prior_bpd if a chain that ends short of noise is what you study"
    for name, (schedule, kwargs, why) in proposals.items():
        if name != chosen and largest_prior_bpd(schedule(T, **kwargs)) <= limit:
            fix = f"use schedule={name}{why} at this T, or {fix}"
            break
    ac_T = objective.diffusion.alphas_cumprod_float64[-1].item()
    reference = largest_prior_bpd(linear_beta_schedule(LINEAR_REFERENCE_TIMESTEPS, **paper))
    raise UserError(f"schedule={chosen} with T={T} does not reach noise: ᾱ_T={ac_T:.3g}, so L_T = KL(q(x_T|x_0) || "
                    f"N(0, I)) is up to {prior:.3g} bits/dim, above training.max_prior_bpd={limit:g} (the paper's "
                    f"T=1000: {reference:.2g}), and sampling from N(0, I) starts where the model never trained; {fix}")


def _plain(node: DictConfig, key: str) -> Any:
    """A node's value as plain Python, interpolations resolved."""
    value = node[key]
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def _check_callbacks_for(cfg: DictConfig, objective) -> None:
    """Callbacks that need what only some objectives have (the paper's figures draw DDPM's Markov chain), and the
    quality callback's extra samplers, whose metric suffixes (val/fid@<tag>) must differ on this objective."""
    quality = cfg.callbacks.get("quality")
    tags = []
    for i, node in enumerate(quality.extra_samplers if quality is not None else []):
        tag = SamplerSpec(**OmegaConf.to_container(node, resolve=True)).tag(objective)
        if tag in tags:
            raise UserError(f"callbacks.quality.extra_samplers[{i}] is {tag} again (entry {tags.index(tag)}); "
                            "drop the repeat or change a setting")
        tags.append(tag)
    figures = cfg.callbacks.get("figures")
    if figures is not None and (figures.every_n_steps > 0 or figures.at_train_end) and not objective.markov_chain:
        raise UserError(f"callbacks.figures draws Ho et al.'s figures of DDPM's Markov chain (forward and reverse "
                        f"chains, progressive coding), which objective={objective.name} has not; set "
                        "callbacks.figures.at_train_end=false callbacks.figures.every_n_steps=0")


def _check_cross_fields(cfg: DictConfig, here: bool = True) -> None:
    """here=False: the job runs on another machine (a SLURM launcher), whose devices are not this one's."""
    for key, data_key in (("in_channels", "channels"), ("image_size", "image_size")):
        if cfg.model[key] != cfg.data[data_key]:
            raise UserError(f"model.{key}={cfg.model[key]} differs from the data's "
                            f"data.{data_key}={cfg.data[data_key]} "
                            f"(the network takes its shape from the data); drop model.{key}=, or set data.{data_key}")
    if cfg.objective.get("timesteps") == "importance" and cfg.objective.get("loss") == "simple":
        raise UserError("objective.timesteps=importance needs the bound (its weights come from the VLB terms), got "
                        "objective.loss=simple; use objective.loss=vlb or hybrid, or objective.timesteps=uniform")
    if str(cfg.trainer.precision) == "16-mixed" and cfg.trainer.accelerator == "cpu":
        raise UserError("trainer.precision=16-mixed needs a CUDA GPU (fp16 autocast with gradient scaling), got "
                        "trainer.accelerator=cpu; use trainer.precision=bf16-mixed on CPU")
    if here and str(cfg.trainer.precision) == "16-mixed" and cfg.trainer.accelerator == "auto":
        import torch

        if not (torch.cuda.is_available() or torch.backends.mps.is_available()):  # auto is the CPU: Lightning would
            # train in bf16-mixed there while the run's config, checkpoint and W&B run say 16-mixed
            raise UserError("trainer.precision=16-mixed needs a GPU, but trainer.accelerator=auto finds none "
                            "here and would train in bf16-mixed instead; use trainer.precision=bf16-mixed (or "
                            "trainer.precision=32-true) on this machine")
    if cfg.model.get("num_classes") is not None and cfg.training.cond_drop_prob == 1:
        raise UserError("training.cond_drop_prob=1.0 replaces every label by \"no label\", so the class-conditional "
                        "model (model.num_classes set) would never see a label; use training.cond_drop_prob=0.1, or "
                        "model.num_classes=null for an unconditional model")
    if here and cfg.trainer.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA GPU is visible; "
                            "use trainer=cpu, or trainer=default to take what the machine has")
    lvb = cfg.trainer.limit_val_batches
    if not (lvb is None or (isinstance(lvb, int) and not isinstance(lvb, bool) and lvb >= 0)
            or (isinstance(lvb, float) and 0.0 <= lvb <= 1.0)):
        raise UserError(f"trainer.limit_val_batches must be null (all), a batch count (an integer >= 0) or a fraction "
                        f"in [0.0, 1.0], got {lvb!r}; try trainer.limit_val_batches=null")
    if cfg.callbacks.get("posthoc_ema") is not None:
        _check_posthoc_ema(cfg.callbacks.posthoc_ema)
    _check_optimizer_kernels(cfg)


def _check_optimizer_kernels(cfg: DictConfig) -> None:
    """optim.optimizer.fused and foreach: not both, and fused only where torch has fused kernels for the device."""
    opt = cfg.optim.optimizer
    if opt.get("fused") and opt.get("foreach"):
        raise UserError("optim.optimizer.fused=true and optim.optimizer.foreach=true exclude each other; "
                        "keep one, e.g. optim.optimizer.foreach=null")
    if opt.get("fused"):
        import torch
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        accelerator = cfg.trainer.accelerator
        device = {"gpu": "cuda", "auto": "cuda" if torch.cuda.is_available() else "cpu"}.get(accelerator, accelerator)
        if device not in _get_fused_kernels_supported_devices():
            raise UserError(f"optim.optimizer.fused=true has no fused kernels on {device} in torch {torch.__version__}"
                            f" (trainer.accelerator={accelerator}); use optim.optimizer.foreach=true instead")
    if cfg.optimized_metric is not None:
        logged = logged_metrics(cfg)
        if cfg.optimized_metric not in logged:
            raise UserError(f"optimized_metric={cfg.optimized_metric} is not logged by this run; choose one of "
                            f"{sorted(logged)} (val/fid needs callbacks.quality, val/bpd validation.bpd_images > 0)")


def logged_metrics(cfg: DictConfig) -> set[str]:
    """The final metrics a train.py run with this config reports (what optimized_metric may name)."""
    names = {"train/loss", "train/mse", "val/loss"}
    if cfg.validation.bpd_images > 0:
        names |= {"val/bpd"} | ({"val/prior_bpd"} if "betas" in cfg.objective else set())  # L_T: DDPM's bound
    quality = cfg.callbacks.get("quality")
    if quality is not None and (quality.at_train_end or quality.every_n_steps > 0):
        dinov2 = bool(quality.get("fd_dinov2") and quality.fd_dinov2.enabled)
        names |= {logged_name(key) for key in result_keys(quality.reference_splits, in_training=True, dinov2=dinov2)}
    return names


def _check_builds(cfg: DictConfig) -> None:
    """The network's and the data's own checks (the constructors take what they are given), then the cheap pieces
    built (the network on the meta device), an argument torch or a constructor refuses named by its config group."""
    import torch

    net = net_kwargs(cfg)
    _check_unet(net)
    with torch.device("meta"):
        try:
            UNet(**net, learned_variance=False)
        except (ValueError, TypeError, RuntimeError) as err:
            raise UserError(f"model cannot be built with these settings ({' '.join(str(err).split())}); fix the "
                            "model.* and data.channels / data.image_size settings") from err
    _check_data(cfg.data)
    _built(lambda: instantiate(cfg.data), "data")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = _built(lambda: instantiate(cfg.optim.optimizer)(params=[param]), "optim.optimizer")
    if cfg.optim.lr_scheduler is not None:
        _built(lambda: instantiate(cfg.optim.lr_scheduler)(optimizer=optimizer), "optim.lr_scheduler")
    if cfg.init_from is not None:
        _check_init_from(cfg)


def _check_unet(net: dict[str, Any]) -> None:
    """model.* (channels and size from the data): what the U-Net's layers need of each other."""
    ch, ch_mult, size, groups = net["ch"], net["ch_mult"], net["image_size"], net["num_groups"]
    total = 2 ** (len(ch_mult) - 1)
    if size % total != 0:
        raise UserError(f"model.image_size={size} is not divisible by the U-Net's total downsampling {total} "
                        f"(ch_mult has {len(ch_mult)} levels); use an image size that is a multiple of {total} "
                        "or fewer ch_mult levels")
    if ch < 4 or ch % groups != 0:  # every channel count is a multiple of ch
        raise UserError(f"model.ch={ch} is not a multiple of model.num_groups={groups} (GroupNorm needs whole groups) "
                        f"or is below 4; use a ch that is a multiple of {groups} or lower num_groups")
    resolutions = [size // 2**i for i in range(len(ch_mult))]
    for r in net["attn_resolutions"]:
        if r not in resolutions:
            raise UserError(f"model.attn_resolutions={list(net['attn_resolutions'])} holds {r}, which never occurs in "
                            f"this U-Net, whose resolutions are {resolutions}; pick attn_resolutions from those")


def _check_data(data: DictConfig) -> None:
    """What a data set's images forbid: another shape than theirs (the keys its module's `fixed_shape` names, the
    values its schema's defaults), flipped digits, downloading a folder, shards that are not there."""
    module, schema = _import(str(data._target_)), OmegaConf.get_type(data)
    if is_dataclass(schema):  # (a DDP worker's config, resolved and untyped, was checked by rank 0)
        for key in getattr(module, "fixed_shape", ()):
            actual = _schema_default(schema, key)
            if data[key] != actual:
                raise UserError(f"data.{key}={data[key]}, but {module.name} images have {key} {actual}; "
                                f"drop data.{key} or set data.{key}={actual}")
    if not isinstance(module, type):
        return
    if issubclass(module, DigitsDataModule) and data.random_flip:
        raise UserError("data.random_flip=true would mirror digits into other symbols; set data.random_flip=false")
    if issubclass(module, ImageFolderDataModule) and data.download:
        raise UserError("data.download=true: an image folder cannot be downloaded; set data.download=false")
    if issubclass(module, StreamingDataModule):  # the shards are there, with a LitData index, of this shape
        check_input_dir(data.input_dir, data.channels, data.image_size)


def _schema_default(schema: type, key: str) -> Any:
    """The default a schema writes for `key` (the one place it is written)."""
    return next(f.default for f in fields(schema) if f.name == key)


def _check_init_from(cfg: DictConfig) -> None:
    """init_from starts a new run from weights; ckpt_path resumes one: never both. The weights themselves are
    checked against the run's network and schedule when train() starts, before anything is built."""
    if cfg.ckpt_path is not None:
        raise UserError(f"init_from={cfg.init_from} and ckpt_path={cfg.ckpt_path} are both set: ckpt_path resumes a "
                        "run (weights, optimizer, step count), init_from starts a new one from weights only; drop one")
    check_source(cfg.init_from, "init_from")


def check_export(cfg: DictConfig) -> None:
    """export.py: the weights are ema or raw, the output folder is new or empty, the checkpoint exists."""
    from pathlib import Path

    _require(cfg.weights in ("ema", "raw"), "weights", cfg.weights, "'ema' or 'raw'", "try weights=ema")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={cfg.out} already exists and is not an empty folder; choose a new folder, e.g. "
                        f"out={cfg.out.rstrip('/')}-2, or remove it")
    check_source(cfg.ckpt, "ckpt")


def check_prepare(cfg: DictConfig) -> None:
    """prepare.py: the output folder is new or empty (and not the input), the data set's own checks pass."""
    from pathlib import Path

    out = Path(cfg.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={cfg.out} already exists and is not an empty folder; choose a new folder, e.g. "
                        f"out={cfg.out.rstrip('/')}-2, or remove it")
    if "input_dir" in cfg.data:
        raise UserError(f"data=streaming reads shards, prepare.py writes them; choose the data they are made of, "
                        f"e.g. data=cifar10 data.root=PATH out={cfg.out}")
    check_targets(cfg)
    _check_data(cfg.data)


def _built(build: Callable[[], Any], key: str) -> Any:
    """build(); its UserError or argument error as one line naming the config group."""
    try:
        return build()
    except (UserError, InstantiationException) as err:
        cause = err if isinstance(err, UserError) else err.__cause__
        if not isinstance(cause, UserError):
            reason = " ".join(str(cause or err).split())
            raise UserError(f"{key} cannot be built with these settings ({reason}); fix them, e.g. drop the "
                            f"overrides of {key}") from err
        message = str(cause)
        raise UserError(message if message.startswith(key.split(".")[0]) else f"{key}: {message}") from err
    except (ValueError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err.__cause__ or err).split())
        raise UserError(f"{key} cannot be built with these settings ({reason}); fix them, e.g. drop the "
                        f"overrides of {key}") from err


def _require(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise UserError(f"{key} must be {rule}, got {_fmt_value(value)}; {fix}")


def _check_posthoc_ema(node: DictConfig) -> None:
    """callbacks.posthoc_ema: widths a power function has, distinct (the cadences are the schema's rules)."""
    key = "callbacks.posthoc_ema"
    sigma_rels = list(node.sigma_rels)
    default = ",".join(f"{s:.2f}" for s in PostHocEMAConfig().sigma_rels)
    _require(bool(sigma_rels) and len(set(sigma_rels)) == len(sigma_rels) and
             all(0 < s <= SIGMA_REL_MAX for s in sigma_rels), f"{key}.sigma_rels", sigma_rels,
             f"distinct widths in (0, {SIGMA_REL_MAX:.4f}]", f"try {key}.sigma_rels=[{default}]")


def check_posthoc_sigma_rel(sigma_rel: float | None, key: str = "ema.sigma_rel") -> None:
    """A width to rebuild (evaluate.py ema.sigma_rel): null (the classic EMA) or in (0, 1/sqrt(12)]."""
    _require(sigma_rel is None or 0 < sigma_rel <= SIGMA_REL_MAX, key, sigma_rel,
             f"in (0, {SIGMA_REL_MAX:.4f}] (1/sqrt(12) is the plain average of the whole run) or null",
             f"try {key}=0.05")


def check_targets(cfg: DictConfig, prefix: str = "") -> None:
    """Every `_target_` in the config names something importable (a typo is one line, not a traceback)."""
    for key in cfg.keys():
        if OmegaConf.is_interpolation(cfg, key) or OmegaConf.is_missing(cfg, key):
            continue
        child = cfg._get_node(key)
        if key == "_target_":
            try:
                _import(str(cfg[key]))
            except Exception as err:  # what an import of a user's path raises is open-ended
                raise UserError(f"{prefix}_target_={cfg[key]} cannot be imported ({type(err).__name__}); give a "
                                "dotted path to a class or function, e.g. torch.optim.AdamW") from err
        elif isinstance(child, DictConfig) and not child._is_none():
            check_targets(child, f"{prefix}{key}.")


def check_samplers(cfg: DictConfig, objective=None) -> list[SamplerSpec]:
    """Every node of the config whose schema is SamplerSpec, checked with its full key (and against the objective
    when it is known: train.py's; the other commands' is their checkpoint's, checked when it is read)."""
    specs = []
    for key, node in _walk(cfg):
        if OmegaConf.get_type(node) is SamplerSpec:
            spec = as_sampler_spec(OmegaConf.to_container(node, resolve=True), key) if objective is None else \
                SamplerSpec(**OmegaConf.to_container(node, resolve=True)).check(key).check_for(objective, key)
            specs.append(spec)
    return specs


def _walk(node: Any, prefix: str = ""):
    """(key, node) for every config node below `node` (lists indexed as key[i]), without resolving values."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue
            child, full = node._get_node(key), f"{prefix}{key}"
            if isinstance(child, DictConfig | ListConfig) and not child._is_none():
                yield full, child
                yield from _walk(child, full + ".")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, DictConfig | ListConfig) and not child._is_none():
                yield f"{prefix.rstrip('.')}[{i}]", child
                yield from _walk(child, f"{prefix.rstrip('.')}[{i}].")


def _import(path: str) -> Any:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {path}")


FEATURE_OPTIONS = {"weights_path": ("inception", "auto"), "cache_dir": ("digits", "auto"), "target": ("module",)}


def check_feature_extractor(fe: DictConfig, key: str) -> None:
    """Each option belongs to the extractor that reads it; a module target imports; a weights file exists."""
    for option, readers in FEATURE_OPTIONS.items():
        if fe[option] not in (None, "") and fe.name not in readers:
            raise UserError(f"{key}.{option}={fe[option]} is read only by {key}.name in {list(readers)}, got "
                            f"{key}.name={fe.name}; drop {key}.{option}, or set {key}.name={readers[0]}")
    if fe.name == "module":
        if not fe.target:
            raise UserError(f"{key}.name=module needs {key}.target, got {_fmt_value(fe.target)}; give "
                            f"{key}.target=package.module.Class (an nn.Module mapping uint8 images to features)")
        try:
            _import(fe.target)
        except (ImportError, AttributeError, ValueError) as err:
            raise UserError(f"{key}.target={fe.target} cannot be imported ({err}); give {key}.target="
                            "package.module.Class (an nn.Module mapping uint8 images to features)") from None
    if fe.weights_path:
        from pathlib import Path

        if not Path(fe.weights_path).expanduser().is_file():
            raise UserError(f"{key}.weights_path={fe.weights_path} is not a file; give the path of FID's Inception "
                            "weights (weights-inception-2015-12-05-6726825d.pth), or drop the key for the default")


def check_fd_dinov2(node: DictConfig, key: str) -> None:
    """weights_path is read only with enabled=true, and is a file (the default file is checked when the network is
    built, with the message saying where to get it)."""
    if node.weights_path in (None, ""):
        return
    if not node.enabled:
        raise UserError(f"{key}.weights_path={node.weights_path} is read only with {key}.enabled=true, got "
                        f"{key}.enabled=false; set {key}.enabled=true, or drop {key}.weights_path")
    from pathlib import Path

    if not Path(node.weights_path).expanduser().is_file():
        raise UserError(f"{key}.weights_path={node.weights_path} is not a file; give the path of DINOv2 ViT-L/14's "
                        "weights (dinov2_vitl14_pretrain.pth), or drop the key for the default")


def _fmt_value(value: Any) -> str:
    return "''" if value == "" else "null" if value is None else str(value)


def validate_entry(config_name: str, cfg: DictConfig, here: bool = True) -> None:
    """The checks of an entry point's config before Hydra starts the job: train.py's all; export.py's paths; the
    others' rules, targets, samplers and data module (their checkpoint is read by the job itself, before its first
    image); the post-hoc EMA width of the commands that choose weights."""
    if config_name == "train":
        validate(cfg, here)
        return
    check_rules(cfg)
    if config_name == "export":
        check_export(cfg)
        return
    if config_name == "prepare":
        check_prepare(cfg)
        return
    check_targets(cfg)
    check_samplers(cfg)
    if "feature_extractor" in cfg:
        check_feature_extractor(cfg.feature_extractor, "feature_extractor")
    if "fd_dinov2" in cfg:
        check_fd_dinov2(cfg.fd_dinov2, "fd_dinov2")
    table = cfg.get("sampler_table")
    if table is not None and table.tuned_ckpt is not None:
        if not table.enabled:
            raise UserError(f"sampler_table.tuned_ckpt={table.tuned_ckpt} adds rows to the sampler table, which is "
                            "off; set sampler_table.enabled=true, or drop sampler_table.tuned_ckpt")
        check_source(table.tuned_ckpt, "sampler_table.tuned_ckpt")
    if "ema" in cfg:  # sample.py, figures.py, evaluate.py: the same choice of weights
        check_posthoc_sigma_rel(cfg.ema.sigma_rel)
        if cfg.ema.snapshot_dir and cfg.ema.sigma_rel is None:
            raise UserError(f"ema.snapshot_dir={cfg.ema.snapshot_dir} is read only with ema.sigma_rel (a post-hoc EMA "
                            "width), which is null; set ema.sigma_rel=0.05, or drop ema.snapshot_dir")
    if "data" in cfg:
        _check_data(cfg.data)
        _built(lambda: instantiate(cfg.data), "data")
