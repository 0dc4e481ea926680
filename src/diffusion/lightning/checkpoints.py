"""Checkpoints that are never half-written, and one-line errors for checkpoints that cannot be used.

`AtomicCheckpointIO` writes each checkpoint to a temporary file beside its destination, fsyncs it and
renames it onto the final name: a full disk or a crash leaves the previous checkpoint there whole.
(Lightning's own writer stages the file in the system temp directory, which may lie on another disk,
and then copies it under the final name, so a copy that fails part-way leaves a truncated checkpoint.)
`check_checkpoint` loads a .ckpt the way resuming and sampling do and says in one line what is wrong.
`load_module` and `init_weights` also take a local diffusers folder (`diffusion.formats.diffusers`).
"""

import contextlib
import errno
import inspect
import math
import os
import pickle
import re
import struct
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion.core.posthoc_ema import load_posthoc_ema
from diffusion.errors import UserError
from diffusion.files import fsync_dir, write_durably
from diffusion.formats.diffusers import read_diffusers_folder
from diffusion.formats.sources import EXAMPLE, check_source
from diffusion.lightning.module import DiffusionModule

_FIXES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or use a filesystem that allows larger files",
    errno.EACCES: "make that directory writable",
    errno.EPERM: "make that directory writable",
    errno.EROFS: "that disk is read-only; write elsewhere",
}


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file in the destination's directory, fsync, then os.replace onto it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: fsspec's own way
        path = Path(path)
        buffer = BytesIO()
        torch.save(checkpoint, buffer)  # serialize first: a pickling bug is not a disk problem
        existed = path.is_file()
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_durably(tmp, buffer.getbuffer())
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):  # the write error below is the one to report
                tmp.unlink()
            raise UserError(_write_error(path, err, existed)) from err
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable; filesystems that cannot fsync a directory are let be."""
    try:
        fsync_dir(path)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise UserError(f"checkpoint {path} was written but its directory could not be synced ({err.strerror}); "
                            f"check that disk, then resume with ckpt_path={path}") from err


def _write_error(path: Path, err: OSError, existed: bool) -> str:
    """One line: the path, the OS error, what is left on disk, and how to go on."""
    fix = _FIXES.get(err.errno, "check that disk")
    last = path.parent / "last.ckpt"
    resume = path if existed else (last if last.is_file() else None)
    state = "the previous checkpoint there is intact" if existed else "no partial file was left"
    go_on = f"resume with ckpt_path={resume}" if resume is not None else "start again"
    return (f"could not write checkpoint {path} ({err.strerror or err}); {state}; {fix}, or set "
            f"callbacks.checkpoint.dirpath=<a directory with room> and {go_on}")


# What torch.load raises on a cut-off or garbled file (found by feeding it truncated and random bytes).
_UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, IndexError, ValueError, struct.error, OSError)
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
LIGHTNING_KEYS = ("state_dict", "hyper_parameters", "global_step")
_DEFAULTS = {k: p.default for k, p in inspect.signature(DiffusionModule).parameters.items()}


class ModelMismatch(UserError):
    """A checkpoint of another model than this run's; `difference` says what differs, in a few words."""

    def __init__(self, message: str, difference: str):
        super().__init__(message)
        self.difference = difference


def check_checkpoint(path, expected: dict | None = None, start_over: str = "start without ckpt_path") -> dict:
    """Load a training checkpoint on the CPU (weights only); raise a one-line UserError if it cannot be used.

    `expected` holds a DiffusionModule's hyperparameters (`module.hparams`): the checkpoint must have the
    same network, betas, parameterization and variance, which are what give its weights their meaning
    (else `ModelMismatch`). `start_over` is how the user starts without this checkpoint, for the messages.
    """
    path = Path(path)
    head = _read_head(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as err:
        raise UserError(_unreadable(path, head, err, start_over)) from err
    _check_kind(path, ckpt)
    if expected is not None:
        _check_matches(path, ckpt["hyper_parameters"], expected, start_over)
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


def _unreadable(path: Path, head: bytes, err: Exception, start_over: str) -> str:
    """Why torch.load failed, told apart by the file's first bytes: cut off, pickled objects, or not torch."""
    earlier = f"resume from an earlier checkpoint (another step*.ckpt in {path.parent}) or {start_over}"
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
    """A Lightning checkpoint (state, hyperparameters, step) of a DiffusionModule (net and betas)."""
    missing = [k for k in LIGHTNING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        held = f"a dict with keys {sorted(map(str, ckpt))[:5]}" if isinstance(ckpt, dict) else \
            f"a {type(ckpt).__name__}"
        raise UserError(f"{path} is not a Lightning training checkpoint: it holds {held}, without {missing}; "
                        f"give a .ckpt file written by train.py, {EXAMPLE}")
    hparams = ckpt["hyper_parameters"]
    absent = [k for k in ("net", "betas") if not isinstance(hparams, dict) or k not in hparams]
    if absent:
        raise UserError(f"{path} is a Lightning checkpoint but not of a DiffusionModule (its hyper_parameters lack "
                        f"{absent}); give a .ckpt file written by train.py, {EXAMPLE}")


def _check_matches(path: Path, hparams: dict, expected: dict, start_over: str | None = None,
                   option: str = "ckpt_path") -> None:
    """The checkpoint's network, betas, parameterization and variance against this run's (`option` names the
    setting that brought the checkpoint in: ckpt_path or init_from; `start_over` how to go without it)."""
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
    if "betas" in expected:
        found = _betas_difference(hparams["betas"], [float(b) for b in expected["betas"]])
        if found is not None:
            return found
    for key in ("parameterization", "variance"):
        have = hparams.get(key, _DEFAULTS[key])
        if key in expected and have != expected[key]:
            return (f"diffusion.{key}={have}, this run has diffusion.{key}={expected[key]}",
                    f"use diffusion.{key}={have}")
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


def read_weights(source, weights: str = "ema", key: str = "ckpt") -> tuple[dict, dict[str, torch.Tensor]]:
    """(hyperparameters, the U-Net's state dict) of a training checkpoint or a local diffusers folder.

    A checkpoint gives its EMA weights (its state_dict, the raw weights when trained without EMA) or, with
    weights="raw", the raw ones; a diffusers folder holds one set (the released one), taken as "ema".
    """
    if weights not in ("ema", "raw"):
        raise UserError(f"weights must be 'ema' or 'raw', got {weights!r}; try weights=ema")
    path = check_source(source, key)
    if path.is_dir():
        if weights == "raw":
            raise UserError(f"{key} {source} is a diffusers folder, which holds one set of weights; use weights=ema")
        unet_kwargs, state, betas, parameterization, variance, _ = read_diffusers_folder(path)
        hparams = {"net": unet_kwargs, "betas": betas.tolist(), "parameterization": parameterization,
                   "variance": variance}
        return hparams, state
    ckpt = check_checkpoint(path)
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


def init_weights(source, expected: dict) -> dict[str, torch.Tensor]:
    """The U-Net weights a new run starts from (init_from): a checkpoint's EMA weights or a diffusers folder's,
    refused in one line unless they have this run's network, betas, parameterization and variance."""
    hparams, state = read_weights(source, "ema", key="init_from")
    _check_matches(Path(source), hparams, expected, option="init_from")
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
    state = check_checkpoint(path)
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
