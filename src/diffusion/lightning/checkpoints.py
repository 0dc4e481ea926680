"""Reading checkpoints: one-line errors for those that cannot be used, the weights a command asks for.

`check_checkpoint` loads a .ckpt the way resuming and sampling do and says in one line what is wrong, and
whether it is of this run's model. `load_weights` gives the module of a checkpoint or a local diffusers folder
(`formats.diffusers`) with the weights asked for: its EMA average, the raw weights, or a post-hoc EMA of any
width rebuilt from the run's snapshots (Karras et al. 2024). Checkpoints written before objectives existed are
read as DDPM's (`upgrade_hparams`).
"""

import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch

from diffusion.core.objectives.base import objective_class, weights_spec
from diffusion.core.objectives.ddpm import DDPM
from diffusion.core.posthoc_ema import load_posthoc_ema
from diffusion.errors import UserError
from diffusion.formats.diffusers import read_diffusers_folder
from diffusion.formats.sources import EXAMPLE, check_source
from diffusion.lightning.module import DiffusionModule

# What torch.load raises on a cut-off or garbled file (found by feeding it truncated and random bytes).
_UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, IndexError, ValueError, struct.error, OSError)
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
LIGHTNING_KEYS = ("state_dict", "hyper_parameters", "global_step")
# What checkpoints written before objectives existed held at the top level, and what DiffusionModule took by default
# then (a diffusers folder's DDPM leaves the training settings out): the DDPM spec they make.
_BEFORE_OBJECTIVES = {"parameterization": "eps", "variance": "fixed_large", "loss_type": "simple",
                      "vlb_weight": 0.001, "min_snr_gamma": None, "timestep_sampler": "uniform"}
_RENAMED = {"loss_type": "loss", "timestep_sampler": "timesteps"}


def upgrade_hparams(hparams: dict) -> dict:
    """A checkpoint's hyperparameters in today's form: before objectives existed, DDPM's settings (betas,
    parameterization, variance, loss_type, ...) lay at the top level; they become its objective spec."""
    if "objective" in hparams or "betas" not in hparams:
        return hparams
    old = dict(hparams)
    old["net"] = {"num_classes": None, **old["net"]}  # an unconditional net's arguments left it out then
    spec = {"_target_": f"{DDPM.__module__}.{DDPM.__qualname__}", "betas": old.pop("betas")}
    for key, default in _BEFORE_OBJECTIVES.items():
        spec[_RENAMED.get(key, key)] = old.pop(key, default)
    return {**old, "objective": spec}


class ModelMismatch(UserError):
    """A checkpoint of another model than this run's; `difference` says what differs, in a few words."""

    def __init__(self, message: str, difference: str):
        super().__init__(message)
        self.difference = difference


def check_checkpoint(path, expected: dict | None = None, start_over: str = "start without ckpt_path",
                     key: str | None = None) -> dict:
    """Load a training checkpoint on the CPU (weights only); raise a one-line UserError if it cannot be used.

    `expected` holds a DiffusionModule's hyperparameters (`module.hparams`): the checkpoint must have the same
    network and objective, with the objective's settings that give the weights their meaning (DDPM's betas,
    parameterization and variance; EDM's σ_data), else `ModelMismatch`. `start_over` is how the user starts
    without this checkpoint, for the messages; `key` the setting of a command that reads the weights (sample.py's
    ckpt, train.py's init_from), whose fix for a damaged file is another checkpoint, not a resume. The checkpoint's
    hyperparameters come back upgraded.
    """
    path = Path(path)
    head = _read_head(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as err:
        raise UserError(_unreadable(path, head, err, start_over, key)) from err
    _check_kind(path, ckpt)
    ckpt["hyper_parameters"] = upgrade_hparams(ckpt["hyper_parameters"])
    if expected is not None:
        check_matches(path, ckpt["hyper_parameters"], expected, start_over)
    return ckpt


def _read_head(path: Path) -> bytes:
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; give the path of a .ckpt file from a training run, "
                        f"{EXAMPLE}")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; give a .ckpt file in it, e.g. {path / 'last.ckpt'}")
    try:
        with path.open("rb") as f:
            return f.read(8)
    except OSError as err:
        raise UserError(f"checkpoint {path} cannot be read ({err.strerror}); check its permissions") from err


def _unreadable(path: Path, head: bytes, err: Exception, start_over: str, key: str | None) -> str:
    """Why torch.load failed, told apart by the file's first bytes: cut off, pickled objects, or not torch."""
    earlier = f"resume from an earlier checkpoint (another step*.ckpt in {path.parent}) or {start_over}" \
        if key is None else _another_checkpoint(path, key)
    if not head:
        return f"checkpoint {path} is empty (0 bytes): its write never completed; {earlier}"
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if refused:
        return (f"{path} holds pickled Python objects ({refused.group(1)}) that a weights-only load refuses, so it "
                f"is not a checkpoint written by train.py; give a .ckpt file from a training run, {EXAMPLE}")
    if head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        size = path.stat().st_size
        return f"checkpoint {path} is truncated or corrupt ({_reason(err)}; {size} bytes); {earlier}"
    return (f"{path} is not a PyTorch checkpoint ({_describe(head)}); give a .ckpt file written by train.py, "
            f"{EXAMPLE}")


def _another_checkpoint(path: Path, key: str) -> str:
    """The fix for a damaged checkpoint that a command reads: the run's latest other checkpoint, by name."""
    others = sorted(p for p in path.parent.glob("*.ckpt") if p.name != path.name and p.stat().st_size > 0)
    latest = max(others, key=lambda p: p.stat().st_mtime, default=None)
    if latest is None:
        return f"no other checkpoint is in {path.parent}; give {key}= a checkpoint of another run, or train again"
    return f"give {key}= another checkpoint of that run, e.g. {key}={latest}"


def _reason(err: Exception) -> str:
    """The first sentence of torch's (often many-line) message, after the exception's name."""
    first = str(err).strip().split("\n")[0].split(". ")[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _describe(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "it is a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "it is a JPEG image"
    if all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        return f"it is text, starting {head.decode()!r}"
    return f"it starts with the bytes {head!r}"


def _check_kind(path: Path, ckpt: Any) -> None:
    """A Lightning checkpoint (state, hyperparameters, step) of a DiffusionModule (net and objective, or betas)."""
    missing = [k for k in LIGHTNING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        held = f"a dict with keys {sorted(map(str, ckpt))[:5]}" if isinstance(ckpt, dict) else \
            f"a {type(ckpt).__name__}"
        raise UserError(f"{path} is not a Lightning training checkpoint: it holds {held}, without {missing}; "
                        f"give a .ckpt file written by train.py, {EXAMPLE}")
    hparams = ckpt["hyper_parameters"]
    absent = ["net"] if not isinstance(hparams, dict) or "net" not in hparams else \
        [] if "objective" in hparams or "betas" in hparams else ["objective"]
    if absent:
        raise UserError(f"{path} is a Lightning checkpoint but not of a DiffusionModule (its hyper_parameters lack "
                        f"{absent}); give a .ckpt file written by train.py, {EXAMPLE}")


def check_matches(path: Path, hparams: dict, expected: dict, start_over: str | None = None,
                   option: str = "ckpt_path") -> None:
    """The checkpoint's network and objective against this run's (`option` names the setting that brought the
    checkpoint in: ckpt_path or init_from; `start_over` how to go without it)."""
    found = _model_difference(hparams, expected)
    if found is not None:
        difference, fix = found
        source = f"checkpoint {path}" if option == "ckpt_path" else f"{option} {path}"
        start_over = start_over or f"start without {option}"
        raise ModelMismatch(f"{source} was trained with {difference}; {fix} or {start_over}",
                            difference)


def _model_difference(hparams: dict, expected: dict) -> tuple[str, str] | None:
    """(what differs, the settings that would match the checkpoint), or None."""
    if "net" in expected:
        key, have, want = _first_net_difference(hparams["net"], expected["net"])
        if key is not None:
            hint = f"model.{key}={_fmt(have)}" if key not in ("in_channels", "out_channels", "image_size") \
                else f"data whose images give {key}={_fmt(have)}"
            return (f"net.{key}={_fmt(have)}, this run has net.{key}={_fmt(want)}",
                    f"use the same model config ({hint})")
    if "objective" in expected:
        return _objective_difference(hparams["objective"], expected["objective"])
    return None


def _objective_difference(have: dict, want: dict) -> tuple[str, str] | None:
    """Another objective, or other settings of the ones that give its weights their meaning (of the objective whose
    network each is: consistency tuning's is the model it tunes)."""
    have, want = weights_spec(have), weights_spec(want)
    have_cls, want_cls = objective_class(have), objective_class(want)
    if have_cls is not want_cls:
        return (f"objective={have_cls.name}, this run has objective={want_cls.name}", f"use objective={have_cls.name}")
    for key in want_cls.identity:
        if key == "betas":
            found = _betas_difference(have["betas"], [float(b) for b in want["betas"]])
            if found is not None:
                return found
        elif have.get(key) != want.get(key):
            return (f"objective.{key}={have.get(key)}, this run has objective.{key}={want.get(key)}",
                    f"use objective.{key}={have.get(key)}")
    return None


# Keys of the net that leave the parameters' shapes and meaning alone: fine-tuning may change them.
_FREE_NET_KEYS = ("dropout", "channels_last")


def _first_net_difference(have: dict, want: dict) -> tuple[str | None, Any, Any]:
    for key in [*want, *(k for k in have if k not in want)]:
        a, b = _plain(have.get(key, "<unset>")), _plain(want.get(key, "<unset>"))
        if key not in _FREE_NET_KEYS and a != b:
            return key, a, b
    return None, None, None


def _betas_difference(have: list[float], want: list[float]) -> tuple[str, str] | None:
    if len(have) != len(want):
        return (f"T={len(have)} timesteps, this run has T={len(want)}",
                f"use schedule.num_timesteps={len(have)} (and its schedule)")
    i = next((i for i, (a, b) in enumerate(zip(have, want, strict=True))
              if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)), None)
    if i is not None:
        return (f"other betas (T={len(have)} in both, betas[{i}]={have[i]:.6g} there, {want[i]:.6g} here)",
                "use the schedule config of its run")
    return None


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _fmt(value: Any) -> str:
    """As a Hydra override would spell it: [1,2,2] rather than [1, 2, 2]."""
    return "[" + ",".join(_fmt(v) for v in value) + "]" if isinstance(value, list) else str(value)


# A module loaded to sample, evaluate or export is not trained: no training settings.
NOT_TRAINED = {"val_timestep_fractions": (), "val_bpd_images": 0, "loss_bins": 1, "on_nonfinite": "stop",
               "nonfinite_check_every_n_steps": 1, "compile": False}


def read_weights(source, weights: str = "ema", key: str = "ckpt") -> tuple[dict, dict[str, torch.Tensor]]:
    """(hyperparameters, the U-Net's state dict) of a training checkpoint or a local diffusers folder.

    A checkpoint gives its EMA weights (its state_dict, the raw weights when trained without EMA) or, with
    weights="raw", the raw ones; a diffusers folder holds one set (the released one), taken as "ema".
    """
    path = check_source(source, key)
    if path.is_dir():
        if weights == "raw":
            raise UserError(f"{key} {source} is a diffusers folder, which holds one set of weights; use weights=ema")
        unet_kwargs, state, objective, _ = read_diffusers_folder(path)
        return {"net": unet_kwargs, "objective": objective, **NOT_TRAINED}, state
    ckpt = check_checkpoint(path, key=key)
    if weights == "raw" and "current_model_state" not in ckpt:
        raise UserError(f"{source} holds no raw weights (trained without EMA); use weights=ema")
    state = ckpt["state_dict"] if weights == "ema" else ckpt["current_model_state"]
    return ckpt["hyper_parameters"], {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def load_module(ckpt, map_location: str | torch.device = "cpu", weights: str = "ema") -> DiffusionModule:
    """A trained module from a checkpoint or a diffusers folder alone, in eval mode (weights: see read_weights)."""
    hparams, state = read_weights(ckpt, weights)
    module = DiffusionModule(**hparams)
    module.net.load_state_dict(state)
    return module.to(map_location).eval()


def load_weights(ckpt, weights: str, sigma_rel: float | None, snapshot_dir=None,
                 map_location: str | torch.device = "cpu") -> tuple[DiffusionModule, str, dict | None]:
    """The module sample.py, figures.py and evaluate.py use: (module, the weights' label for protocols, post-hoc
    EMA info or None). weights=ema|raw, or with sigma_rel the post-hoc EMA of that width (weights must be ema)."""
    if sigma_rel is None:
        return load_module(ckpt, map_location, weights), weights, None
    if weights != "ema":
        raise UserError(f"weights={weights} and ema.sigma_rel={sigma_rel} both choose the weights; drop one "
                        "(ema.sigma_rel: the post-hoc EMA of that width; weights=raw: the raw weights)")
    module, info = load_posthoc_module(ckpt, sigma_rel, snapshot_dir, map_location)
    return module, f"posthoc-ema σ_rel={sigma_rel:g}", info


def init_weights(source, expected: dict) -> dict[str, torch.Tensor]:
    """The U-Net weights a new run starts from (init_from): a checkpoint's EMA weights or a diffusers folder's,
    refused in one line unless they have this run's network and objective."""
    hparams, state = read_weights(source, "ema", key="init_from")
    check_matches(Path(source), hparams, expected, option="init_from")
    return state


def load_posthoc_module(ckpt, sigma_rel: float, snapshot_dir=None,
                        map_location: str | torch.device = "cpu") -> tuple[DiffusionModule, dict]:
    """The checkpoint's module whose net holds the post-hoc EMA of width σ_rel (Karras et al. 2024, Alg. 3),
    rebuilt from its run's snapshots (<run>/posthoc_ema beside <run>/checkpoints/) up to the checkpoint's step.

    Returns the module in eval mode and `load_posthoc_ema`'s info (step, fit error, range, snapshot weights).
    """
    path = check_source(ckpt)
    if path.is_dir():
        raise UserError(f"ckpt {ckpt} is a diffusers folder, which has no post-hoc EMA snapshots; give a training "
                        "run's .ckpt, or drop ema.sigma_rel")
    state = check_checkpoint(path, key="ckpt")
    folder = Path(snapshot_dir) if snapshot_dir else path.resolve().parent.parent / "posthoc_ema"
    net_state, info = load_posthoc_ema(folder, sigma_rel, max_step=int(state["global_step"]))
    module = DiffusionModule(**state["hyper_parameters"])
    try:
        module.net.load_state_dict(net_state)
    except RuntimeError as err:
        raise UserError(f"the post-hoc EMA snapshots in {folder} are not of the net in {ckpt} "
                        f"({str(err).splitlines()[0]}); give that run's folder with ema.snapshot_dir=...") from err
    return module.to(map_location).eval(), {**info, "checkpoint_step": int(state["global_step"]),
                                             "snapshot_dir": str(folder)}
